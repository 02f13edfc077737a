"""The bytes and FLOPs of the memory's kernel launches: their roofline.

A launch (``launch.Launch``, from ``launch.observing_launches`` around a real
call or ``launch.recording_launches`` around one on meta tensors) costs

* bytes: each tensor argument once, read or written (its distinct elements:
  a broadcast dim counts once), as ``AtenOpCounter`` counts an ATen op; the
  launches of one kernel in one call (a chunk's whole row blocks and its
  tail) share their tensors, which count once per kernel;
* FLOPs: its products over the rows it serves, not the padded tile rows:
  ``PRODUCTS[kernel]`` products of 2·d·4d FLOPs per row (2·d·outs for the
  projections), at the 16-bit tensor-core rate where the operands are
  16-bit. The decomposed read's W_0 products (``tf32x3``: three TF32
  products, each at half the 16-bit rate) count as six 16-bit ones, in both
  totals. The scan is elementwise: bytes only.
"""
from typing import Dict, Iterable, NamedTuple, Tuple

from torch import Tensor

from convneur_mm.models.layers.memory_ops.kernels.launch import Launch

# products of 2·d·4d FLOPs per row, as each kernel's code runs them (the
# decomposed read's W_0 products apart: ``BASE_PRODUCTS``)
PRODUCTS = {'read_kernel': 2, 'read_backward_rows_kernel': 5, 'read_backward_cols_kernel': 4,
            'grads_rows_kernel': 2, 'grads_cols_kernel': 4, 'grads_backward_rows_kernel': 14,
            'grads_backward_cols_kernel': 8, 'grads_chunk_kernel': 6,
            'grads_backward_chunk_kernel': 22}
BASE_PRODUCTS = {'read_kernel': 2, 'read_backward_rows_kernel': 5,
                 'read_backward_cols_kernel': 2}
TF32X3_AS_HALF = 6
_READS = ('read_kernel', 'read_backward_rows_kernel', 'read_backward_cols_kernel')


class KernelCost(NamedTuple):
    """Bytes moved and FLOPs, of which ``half_flops`` at the 16-bit rate."""
    bytes: int
    flops: int
    half_flops: int


def kernel_name(launch: Launch) -> str:
    kernel = launch.kernel
    return getattr(kernel, '__name__', None) or kernel.fn.__name__


def _distinct_bytes(t: Tensor) -> int:
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


def _arguments(launch: Launch) -> dict:
    return dict(zip(launch.kernel.arg_names, launch.args), **launch.kwargs)


def _read_rows(a: dict, tiles: int, columns: bool) -> int:
    """The token rows a read kernel's launch serves: per (head, image) and
    chunk, those of its rows from ``r0`` on that its row blocks cover
    (every row for the columns pass)."""
    C, N, L = a['C'], a['N'], a['L']
    blocks = a['hidden_blocks'] if columns else a['row_blocks']
    states = tiles // blocks
    first, end = (0, L) if columns else (a['r0'], a['r0'] + a['row_blocks'] * a['BM'])
    valid = [max(0, min(L, N - c * L)) for c in range(C)]  # a chunk past N reads nothing
    return states // C * sum(max(0, min(v, end) - first) for v in valid)


def _rows_of(name: str, a: dict, grid: int) -> int:
    if name in _READS:  # a program serves ITERS tiles (persistent programs)
        return _read_rows(a, grid * a.get('ITERS', 1), name == 'read_backward_cols_kernel')
    keys = a['k_ptr']  # the chunk gradients: every key row, once per launch
    return keys.numel() // keys.shape[-1]


def launch_flops(launch: Launch) -> Tuple[int, int]:
    """(FLOPs, of which at the 16-bit rate) of one launch."""
    name, a = kernel_name(launch), _arguments(launch)
    half = str(a.get('DTYPE')) != 'fp32'
    if name in PRODUCTS:
        per_row = 2 * a['D'] * a['HID'] * _rows_of(name, a, launch.grid[0])
        flops = PRODUCTS[name] * per_row
        base = (TF32X3_AS_HALF * BASE_PRODUCTS.get(name, 0) * per_row
                if a.get('DECOMPOSED') else 0)
        return flops + base, (flops if half else 0) + base
    if name in ('project_kernel', 'project_backward_kernel'):
        flops = _projection_flops(a, backward=name == 'project_backward_kernel')
        return flops, flops if half else 0
    return 0, 0  # the scan: elementwise


def _projection_flops(a: dict, backward: bool) -> int:
    """x times the folded weight's (outs, d): every row's queries (d
    columns), the written rows' other columns (keys, values, pool logits,
    step sizes). The backward recomputes each product but the values' (their
    cotangent is the product's own) and multiplies the product's gradient by
    the weight."""
    x, w = a['x_ptr'], a['w_ptr']
    images, tokens, d = x.shape
    written, others = a['U'] * a['L'], w.shape[0] - d
    if backward:
        return 2 * d * images * (2 * tokens * d + written * (2 * others - d))
    return 2 * d * images * (tokens * d + written * others)


def kernel_costs(launches: Iterable[Launch]) -> Dict[str, KernelCost]:
    """Each kernel's cost (by name) over ``launches``: FLOPs summed, each
    distinct tensor's bytes once per kernel."""
    costs: Dict[str, list] = {}
    seen: Dict[str, set] = {}
    for launch in launches:
        name = kernel_name(launch)
        total = costs.setdefault(name, [0, 0, 0])
        flops, half = launch_flops(launch)
        total[1] += flops
        total[2] += half
        ids = seen.setdefault(name, set())
        for value in list(launch.args) + list(launch.kwargs.values()):
            if isinstance(value, Tensor) and id(value) not in ids:
                ids.add(id(value))
                total[0] += _distinct_bytes(value)
    return {name: KernelCost(*total) for name, total in costs.items()}
