"""What the Triton implementations share: argument checks, tiles, launches.

Forward only: nothing here records autograd history, so the Triton
implementations serve inference (``torch.no_grad()``). Inputs are float32 (the
memory's states and features stay float32); ``operand_dtype`` is the dtype of
the products' operands, with float32 accumulation (float32 operands multiply
in IEEE float32, not TF32).
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..common import LN_EPS, MemoryWeights
from .availability import OPERAND_DTYPES, launches_skipped, load_kernels, unavailable_reason


def call_kernel_op(op: Callable, implementation: Callable, *args):
    """``op(*args)``: a kernel's custom operator (``torch.library.custom_op``,
    which ``torch.compile`` keeps whole and CUDA graphs capture). Inside
    ``without_launches`` its ``implementation`` itself, so that a count on
    meta tensors sees what the implementation allocates (an operator on
    meta tensors runs its fake, which allocates the results only)."""
    return implementation(*args) if launches_skipped() else op(*args)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_tiles(block_rows: Optional[int], block_hidden: Optional[int]) -> None:
    """Tile sizes given by a caller are powers of two >= 16 (``tl.dot``'s least)."""
    for name, value in (('block_rows', block_rows), ('block_hidden', block_hidden)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f'{name} must be a power of two >= 16, got {value}')


def tile_config(d: int, rows: int, block_rows: Optional[int], block_hidden: Optional[int],
                operand_dtype: torch.dtype, decomposed: bool = False) -> dict:
    """Tile sizes and launch options of a kernel.

    The defaults are the largest tiles whose float32 accumulators compile
    without register spills for sm_80 and sm_90 (ptxas, triton 3.7) at two
    pipeline stages, which also keeps shared memory near 100 KB or below;
    float32 operands (CUDA-core products) and the decomposed read (twice the
    operand tiles) take smaller tiles. They are not tuned by timing.

    Args:
        d: the head width (columns, padded to a power of two).
        rows: the rows of one chunk.
        block_rows, block_hidden: the caller's tile sizes, or None.
        operand_dtype: the products' operand dtype.
        decomposed: a decomposed read.
    """
    bd = max(16, _next_pow2(d))
    check_tiles(block_rows, block_hidden)
    if operand_dtype == torch.float32 or decomposed:
        bm, bh = 16, 16
    else:
        bm, bh = (32, 32) if bd <= 128 else (16, 32)
    bm = block_rows or min(bm, max(16, _next_pow2(rows)))
    return dict(BM=bm, BD=bd, BH=block_hidden or bh, num_warps=4 if bd <= 128 else 8,
                num_stages=2)


def check_arguments(tensors: Sequence[Tuple[str, Tensor, Tuple[str, ...]]],
                    operand_dtype: torch.dtype,
                    tiles: Tuple[Optional[int], Optional[int]]) -> None:
    """Tile sizes, shapes (named sizes must agree wherever they appear),
    float32, one device, no autograd: each failure an error naming the
    argument.

    Args:
        tensors: (name, tensor, the names of its sizes) of each argument.
        operand_dtype: the products' operand dtype.
        tiles: the caller's (block_rows, block_hidden).
    """
    check_tiles(*tiles)
    sizes = {}
    for name, t, shape in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f'{name} must be a tensor, got {type(t).__name__}')
        if t.dim() != len(shape):
            raise ValueError(f'{name} must have {len(shape)} dims, got shape {tuple(t.shape)}')
        for axis, (size_name, got) in enumerate(zip(shape, t.shape)):
            want, where, want_axis = sizes.setdefault(size_name, (got, name, axis))
            if want != got:
                raise ValueError(f'{name} has size {got} in dim {axis}, but {where} has '
                                 f'{want} in dim {want_axis} for the same quantity')
        if t.dtype != torch.float32:
            raise TypeError(f'the memory kernels take float32 tensors; {name} is {t.dtype}')
    first = tensors[0][1]
    for name, t, _ in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f'{name} is on {t.device}, {tensors[0][0]} on {first.device}')
    if operand_dtype not in OPERAND_DTYPES:
        raise ValueError(f'operand_dtype must be one of {OPERAND_DTYPES}, got {operand_dtype}')
    if torch.is_grad_enabled() and any(t.requires_grad for _, t, _ in tensors):
        raise RuntimeError('the memory kernels are forward-only (no autograd): call them under '
                           'torch.no_grad(), or use the PyTorch implementations for training')


def check_decomposed(base: Optional[MemoryWeights], carry: Optional[Tensor], heads_dim: str,
                     carry_shape: Tuple[str, ...]) -> list:
    """``check_arguments``' entries of a decomposed read's ``base`` and ``carry``."""
    if (base is None) != (carry is None):
        raise ValueError('a decomposed read needs both base and carry')
    if base is None:
        return []
    return [('base.w1', base.w1, (heads_dim, 'd', 'h')),
            ('base.w2', base.w2, (heads_dim, 'h', 'd')), ('carry', carry, carry_shape)]


def check_runnable(t: Tensor, operand_dtype: torch.dtype) -> None:
    """An error naming why the kernels cannot run for ``t``'s device and width."""
    why = unavailable_reason(t.device, t.shape[-1], operand_dtype)
    if why is not None:
        raise RuntimeError(f'the fused memory kernels cannot run: {why}')


def check_span(name: str, rows: int, t: Tensor, row_dim: int = -2) -> None:
    """Offsets inside a tile are int32: a chunk's ``rows`` along ``row_dim``,
    with the features of the last dim (unless that is the row dim), must span
    < 2**31 elements. The outer dims are addressed by int64 base offsets.

    Args:
        name: the argument, for the error.
        rows: the rows of one chunk.
        t: the tensor (its strides).
        row_dim: the dim of its rows.
    """
    span = rows * abs(t.stride(row_dim))
    if row_dim % t.dim() != t.dim() - 1:
        span += t.shape[-1] * abs(t.stride(-1))
    if span >= 2**31:
        raise ValueError(f'{name}: a chunk of {rows} rows with strides {t.stride()} spans '
                         'more than 2**31 elements, beyond the kernels\' int32 tile offsets')


class _NoLaunch:
    """``kernels.<name>[grid](...)`` that launches nothing (``without_launches``)."""

    def __getattr__(self, name):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def launch_config(operand_dtype: torch.dtype, device: torch.device) -> Tuple[object, dict]:
    """The kernels module and the constexprs of an operand dtype.

    float32 operands multiply in IEEE float32 (as the PyTorch path with TF32
    off). The W_0 part of a decomposed read needs float32 accuracy at tensor
    core speed: three TF32 products (``tf32x3``) on NVIDIA GPUs that have
    TF32, IEEE float32 elsewhere (and in the interpreter, which ignores it)."""
    if launches_skipped():
        return _NoLaunch(), dict(DTYPE=None, PREC='ieee', BASE_PREC='ieee')
    import triton.language as tl
    kernels, _, interpreted = load_kernels()
    dtype = {torch.float32: tl.float32, torch.float16: tl.float16,
             torch.bfloat16: tl.bfloat16}[operand_dtype]
    base = 'ieee'
    if (not interpreted and device.type == 'cuda' and torch.version.hip is None and
            torch.cuda.get_device_capability(device) >= (8, 0)):
        base = 'tf32x3'
    return kernels, dict(DTYPE=dtype, PREC='ieee', BASE_PREC=base)


def launch_read(weights: MemoryWeights, x: Tensor, out: Tensor, length: int,
                operand_dtype: torch.dtype, base: Optional[MemoryWeights],
                carry: Optional[Tensor], block_rows: Optional[int],
                block_hidden: Optional[int]) -> Tensor:
    """Launch the read kernel: x and out (H, B, N, d), weights (H, B, C, ...),
    base (H, ...) or None, carry (H, B, C) or None; token n reads chunk
    n // length. Returns ``out``."""
    w1, w2, g = weights
    heads, batch, n, d = x.shape
    chunks, hidden = w1.shape[2], w1.shape[-1]
    if out.numel() == 0:
        return out
    check_span('x', length, x)
    check_span('out', length, out)
    decomposed = base is not None
    tiles = tile_config(d, min(length, n), block_rows, block_hidden, operand_dtype, decomposed)
    kernels, cfg = launch_config(operand_dtype, x.device)
    row_blocks = cdiv(length, tiles['BM'])
    if decomposed:
        b1, b2, c_strides = base.w1, base.w2, carry.stride()
    else:  # unread (DECOMPOSED is a constexpr): any pointers and strides
        b1, b2, c_strides = w1[:, 0, 0], w2[:, 0, 0], (0, 0, 0)
    kernels.read_kernel[(heads * batch * chunks * row_blocks,)](
        x, w1, w2, g, out, b1, b2, carry if decomposed else x,
        batch, chunks, n, length, d, hidden, row_blocks,
        *x.stride(), *w1.stride(), *w2.stride(), *g.stride(), *out.stride(),
        *b1.stride(), *b2.stride(), *c_strides,
        LN_EPS, DECOMPOSED=decomposed, **tiles, **cfg)
    return out
