"""Where a call's device time goes, kernel by kernel, beside its roofline.

``profile_kernels`` runs a call under ``torch.profiler`` and sums the time of
each kernel name (CUDA: the kernels' device time; on a CPU, which has no
kernels, each event's self time), and of each ATen op (the device time of the
kernels it launched). ``count_costs`` counts the bytes and FLOPs of each ATen
op of a call (``AtenOpCounter``'s bytes, torch's FLOP formulas), and a card's
peak (``device_peak``) prices them: the roofline time printed beside the
measured one, per op and for the whole call. The memory's Triton kernels are
priced one by one (``with_kernel_costs``: their launches' bytes and FLOPs,
``kernel_costs``), so each kernel's time stands beside its own roofline.

A kernel launch (``launcher.Launch``, from ``launcher.observing_launches``
around a real call or ``launcher.recording_launches`` around one on meta
tensors) costs

* bytes: each tensor argument once, read or written (its distinct elements:
  a broadcast dim counts once), as ``AtenOpCounter`` counts an ATen op; the
  launches of one kernel in one call (a chunk's whole row blocks and its
  tail) share their tensors, which count once per kernel;
* FLOPs: its products over the rows it serves, not the padded tile rows:
  ``PRODUCTS[kernel]`` products of 2·d·4d FLOPs per row (2·d·outs for the
  projections), at the 16-bit tensor-core rate where the operands are
  16-bit. The decomposed read's products with its whole state (float32
  operands, ``tf32x3``: three TF32 products, each at half the 16-bit rate)
  count as six 16-bit ones, in both totals, as do the exact queries of its
  projections. The scan is
  elementwise: bytes only.

Seven cases profile the four global branches of ConvNeur-M3 (``CASES``): one
batch-128 call with bf16 operands through the fused Triton kernels
(``'triton'``), the same through PyTorch (``'torch'``), and one bf16
training step, forward and backward, through PyTorch (``'training'``) and
through the Triton kernels (``'training_triton'``); and M4's call through the
kernels (``'triton_m4'``), the same with every row in one padded column
block (``'triton_m4_one_block'``: what two blocks gain) and through PyTorch
(``'torch_m4'``: whether ``implementation='auto'`` should take the kernels at M4's
width). Each roofline counts the true columns, so M4's kernels (160 columns
as 128 + 32, ``tiles.column_blocks``, the projection's included) against
M3's (128), each beside its roofline, say what M4's width costs.
"""
import argparse
import re
from collections import Counter
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import flop_registry

from benchmarks.common.record import Record
from benchmarks.common.subjects import M3_SIZE, branch_inputs, convneur_backbone, stage_branches
from convneur_mm.analysis.timing import is_cuda, synchronize
from convneur_mm.models.layers.memory_ops.kernels.launcher import Launch
from convneur_mm.testing.dispatch_probes import AtenOpCounter, tensors_in
from convneur_mm.utils.cli import positive_int
from convneur_mm.utils.tables import markdown_table

HALF_DTYPES = (torch.float16, torch.bfloat16)
CUSTOM_OPS_PREFIX = 'convneur_mm::'  # the memory's operators: their kernels are priced instead


# ------------------------------------------------------ the kernels' costs
# products of 2·d·4d FLOPs per row, as each kernel's code runs them; of those, the
# decomposed read's products with its whole state a_t W_0 + dW (``BASE_PRODUCTS``)
# take float32 operands
PRODUCTS = {'read_kernel': 2, 'read_backward_rows_kernel': 5, 'read_backward_cols_kernel': 4,
            'grads_rows_kernel': 2, 'grads_cols_kernel': 4, 'grads_backward_rows_kernel': 14,
            'grads_backward_cols_kernel': 8, 'grads_chunk_kernel': 6,
            'grads_backward_chunk_kernel': 22, 'read_backward_chunk_kernel': 9}
BASE_PRODUCTS = {'read_kernel': 2, 'read_backward_rows_kernel': 5,
                 'read_backward_cols_kernel': 2, 'read_backward_chunk_kernel': 7}
TF32X3_AS_HALF = 6
_READS = ('read_kernel', 'read_backward_rows_kernel', 'read_backward_cols_kernel',
          'read_backward_chunk_kernel')


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


def _read_rows(a: dict, tiles: int, name: str) -> int:
    """The token rows a read kernel's launch serves: per (head, image) and
    chunk, those of its rows from ``r0`` on that its row blocks cover
    (every row for the columns pass and one program per state)."""
    C, N, L = a['C'], a['N'], a['L']
    rows_pass = name in ('read_kernel', 'read_backward_rows_kernel')
    blocks = {'read_backward_cols_kernel': a.get('hidden_blocks'),
              'read_backward_chunk_kernel': 1}.get(name, a.get('row_blocks'))
    states = tiles // blocks
    first, end = (a['r0'], a['r0'] + a['row_blocks'] * a['BM']) if rows_pass else (0, L)
    valid = [max(0, min(L, N - c * L)) for c in range(C)]  # a chunk past N reads nothing
    return states // C * sum(max(0, min(v, end) - first) for v in valid)


def _rows_of(name: str, a: dict, grid: int) -> int:
    if name in _READS:  # a program serves ITERS tiles (persistent programs)
        return _read_rows(a, grid * a.get('ITERS', 1), name)
    keys = a['k_ptr']  # the chunk gradients: every key row, once per launch
    return keys.numel() // keys.shape[-1]


def launch_flops(launch: Launch) -> Tuple[int, int]:
    """(FLOPs, of which at the 16-bit rate) of one launch."""
    name, a = kernel_name(launch), _arguments(launch)
    half = str(a.get('DTYPE')) != 'fp32'
    if name in PRODUCTS:
        per_row = 2 * a['D'] * a['HID'] * _rows_of(name, a, launch.grid[0])
        whole = BASE_PRODUCTS.get(name, 0) if a.get('DECOMPOSED') else 0
        flops = (PRODUCTS[name] - whole) * per_row
        base = TF32X3_AS_HALF * whole * per_row
        return flops + base, (flops if half else 0) + base
    if name in ('project_kernel', 'project_backward_kernel'):
        flops = _projection_flops(a, backward=name == 'project_backward_kernel')
        if not half:
            return flops, 0
        if str(a.get('QDTYPE', a['DTYPE'])) != 'fp32':
            return flops, flops
        # exact queries: float32 operands for every row's queries
        x = a['x_ptr']
        queries = 2 * x.shape[-1] ** 2 * x.shape[0] * x.shape[1]
        if a.get('QPREC') == 'tf32x3':
            exact = flops - queries + TF32X3_AS_HALF * queries
            return exact, exact
        return flops, flops - queries
    if name == 'gates_kernel':  # the three gate layers' float32 products
        summary, outs = a['s_ptr'], a['wd_ptr'].shape[0] * (2 + a['K'])
        return 2 * summary.shape[-1] * outs * a['R'], 0
    return 0, 0  # the scan, the pool's merge and the fold: elementwise


def _projection_flops(a: dict, backward: bool) -> int:
    """x times the folded weight's (outs, d): every row's queries (d
    columns), the written rows' other columns (keys, values, pool logits,
    step sizes). The backward recomputes each product but the values' (their
    cotangent is the product's own) and multiplies the product's gradient by
    the weight; in blocks of output features (BO > 0) with heads in two
    column blocks (BHE > 0) it computes the heads' (queries', keys')
    products twice, for their norms' statistics first."""
    x, w = a['x_ptr'], a['w_ptr']
    images, tokens, d = x.shape
    written, others = a['U'] * a['L'], w.shape[0] - d
    if backward:
        heads_again = tokens * d + written * d if a.get('BO') and a.get('BHE') else 0
        return 2 * d * images * (2 * tokens * d + written * (2 * others - d) + heads_again)
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


# ------------------------------------------------------------ the profile
class DevicePeak(NamedTuple):
    """A card's datasheet ceilings: bytes/s of its memory, FLOP/s of dense
    16-bit products on tensor cores and of plain float32 arithmetic."""
    name: str
    bandwidth: float
    half_flops: float
    float_flops: float


# datasheet leads (SXM parts); .dev_scripts measure the card's own ceilings
PEAKS = (
    DevicePeak('H200', 4.8e12, 989e12, 67e12),
    DevicePeak('H100 SXM', 3.35e12, 989e12, 67e12),
)


def device_peak(device) -> Optional[DevicePeak]:
    """The ``PEAKS`` entry of ``device``'s card, read from its name; None for
    a CPU or a card not in the table (an H100 PCIe or NVL, or an H200 NVL, has
    other ceilings)."""
    if not is_cuda(device):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    if any(part in name for part in ('PCIe', 'NVL')):
        return None
    if 'H200' in name:
        return PEAKS[0]
    if 'H100' in name:
        return PEAKS[1]
    return None


class OpCost(NamedTuple):
    """Bytes an op reads and writes (each tensor once) and its FLOPs, of
    which ``half_flops`` have 16-bit operands (tensor-core rate)."""
    bytes: int
    flops: int
    half_flops: int

    def roofline_s(self, peak: DevicePeak) -> float:
        """The op's least time on ``peak``'s card: its bytes at the bandwidth
        or its products at their rate, whichever takes longer."""
        compute = (self.half_flops / peak.half_flops
                   + (self.flops - self.half_flops) / peak.float_flops)
        return max(self.bytes / peak.bandwidth, compute)


class AtenCostCounter(AtenOpCounter):
    """``AtenOpCounter`` that also counts each op's FLOPs with torch's FLOP
    formulas (``torch.utils.flop_counter``: products, convolutions,
    attention; element-wise ops count none), apart for 16-bit operands."""

    def __init__(self):
        super().__init__()
        self.flops: Counter = Counter()
        self.half_flops: Counter = Counter()
        self.namespaces: Dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = str(func.overloadpacket.__name__)
        self.namespaces[name] = func.namespace
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            # torch's formulas take the default overload's arguments: the output
            # dtype of bmm.dtype (CUDA's bf16 product into float32) is not one
            shaped = tuple(a for a in args if not isinstance(a, torch.dtype))
            flops = formula(*shaped, **(kwargs or {}), out_val=out)
            self.flops[name] += flops
            if any(t.dtype in HALF_DTYPES for t in tensors_in((args, kwargs))):
                self.half_flops[name] += flops
        return out

    def costs(self) -> Dict[str, OpCost]:
        """Per op, named as the profiler names it (``aten::mm``; the memory's
        custom operators ``convneur_mm::memory_read``)."""
        return {f'{self.namespaces[name]}::{name}': OpCost(self.bytes[name], self.flops[name],
                                                          self.half_flops[name])
                for name in self.kernels}


def count_costs(fn: Callable[[], object]) -> Dict[str, OpCost]:
    """Bytes and FLOPs of each op of one call of ``fn`` (on any device,
    ``meta`` included). A custom operator counts as its arguments and
    results, without FLOPs: ``with_kernel_costs`` prices its kernels."""
    with AtenCostCounter() as counter:
        fn()
    return counter.costs()


def with_kernel_costs(fn: Callable[[], object], costs: Dict[str, OpCost],
                      device) -> Dict[str, OpCost]:
    """``costs`` (``count_costs``) with the memory's custom operators
    replaced by the kernels they launch, each priced by its own bytes and
    FLOPs (``kernel_costs``), from one more call of ``fn``: run as usual
    (``observing_launches``), or on meta tensors recorded for sm_90 without
    running (``recording_launches``). The few ATen ops inside the operators
    (the sums of per-block shares, the weights' casts) stay unpriced."""
    from convneur_mm.models.layers.memory_ops.kernels.launcher import (
        observing_launches, recording_launches)
    meta = torch.device(device).type == 'meta'
    with (recording_launches(90) if meta else observing_launches()) as launches:
        fn()  # on meta tensors a training step records its backward's launches too
    priced = {name: cost for name, cost in costs.items()
              if not name.startswith(CUSTOM_OPS_PREFIX)}
    priced.update({name: OpCost(*cost) for name, cost in kernel_costs(launches).items()})
    return priced


def total_cost(costs: Dict[str, OpCost]) -> OpCost:
    return OpCost(*(sum(values) for values in zip(*costs.values()))) if costs else OpCost(0, 0, 0)


def _rows(events, names: Callable[[object], bool], cuda: bool, repeats: int) -> List[dict]:
    """name -> calls and ms per profiled call of the events ``names`` keeps,
    the largest first."""
    rows = []
    for event in events:
        if not names(event):
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        rows.append(dict(name=event.key, count=event.count / repeats, ms=us / 1e3 / repeats))
    return sorted(rows, key=lambda row: -row['ms'])


def _cost_of(name: str, costs: Dict[str, OpCost]) -> Optional[OpCost]:
    """The cost of a profiled name: its own, or that of the kernel it names
    with a suffix (a compiler may append the specialization to a kernel's name)."""
    if name in costs:
        return costs[name]
    return next((cost for key, cost in costs.items() if name.startswith(key + '_')), None)


def _price(rows: List[dict], costs: Dict[str, OpCost], peak: Optional[DevicePeak]) -> None:
    for row in rows:
        cost = _cost_of(row['name'], costs)
        row['roofline_ms'] = cost.roofline_s(peak) * 1e3 if cost and peak else None


def profile_kernels(fn: Callable[[], object], *, device, warmup: int = 2, top: int = 25,
                    repeats: int = 1, costs: Optional[Dict[str, OpCost]] = None,
                    peak: Optional[DevicePeak] = None,
                    trace_path: Optional[str] = None) -> dict:
    """Profile ``fn`` and sum its time by kernel name and by ATen op.

    Args:
        fn: the call, without arguments.
        device: where ``fn`` runs: on CUDA the profiler records the kernels
            (CUDA activity); on a CPU each event's self time stands for them.
        warmup: untimed calls first (Triton's compilation, cuBLAS handles).
        top: rows kept in each table.
        repeats: profiled calls; times and counts are per call.
        costs: bytes and FLOPs by kernel or op name (``count_costs``): each
            row of that name gets its roofline, and their sum the call's.
        peak: the card's ceilings; by default ``device_peak(device)``; with
            none, no roofline is given.
        trace_path: where to write the Chrome trace, if given.

    Returns:
        ``kernels``: the ``top`` kernels (name, calls, ms, share, roofline
        ms); ``ops``: the ``top`` ATen ops by the time of their kernels;
        ``total_ms``: all kernels; ``listed_ms``: the listed kernels;
        ``outside_ops_ms``: kernel time no ATen op launched (Triton's);
        ``call``: the whole call's bytes, FLOPs, roofline ms and measured
        ms over roofline, where ``costs`` are given.
    """
    if top < 1 or repeats < 1:
        raise ValueError(f'top and repeats must be at least 1, got {top} and {repeats}')
    cuda = is_cuda(device)
    peak = peak or device_peak(device)
    costs = costs or {}
    for _ in range(warmup):
        fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        synchronize(device)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    events = prof.key_averages()
    # on CUDA the kernels, copies and sets are the device's own events; on
    # a CPU every event's self time is host time, which partitions the call
    kernels = _rows(events, (lambda e: e.device_type != DeviceType.CPU) if cuda
                    else (lambda e: True), cuda, repeats)
    ops = _rows(events, lambda e: e.device_type == DeviceType.CPU and e.key.startswith('aten::'),
                cuda, repeats)
    ops = [row for row in ops if row['ms'] > 0]
    total = sum(row['ms'] for row in kernels)
    for row in kernels:
        row['share'] = row['ms'] / total if total else 0.0
    _price(kernels, costs, peak)
    _price(ops, costs, peak)
    listed = kernels[:top]
    summary = dict(
        device=torch.cuda.get_device_name(torch.device(device)) if cuda else 'cpu',
        activity='cuda' if cuda else 'cpu', repeats=repeats,
        peak=peak._asdict() if peak else None,
        total_ms=total, listed_ms=sum(row['ms'] for row in listed),
        num_kernel_names=len(kernels), kernels=listed, ops=ops[:top],
        outside_ops_ms=total - sum(row['ms'] for row in ops) if cuda else 0.0,
        call=None)
    if costs:
        cost = total_cost(costs)
        roofline = cost.roofline_s(peak) * 1e3 if peak else None
        summary['call'] = dict(bytes=cost.bytes, flops=cost.flops, half_flops=cost.half_flops,
                               roofline_ms=roofline,
                               over_roofline=total / roofline if roofline else None)
    return summary


def _ms(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.3f}'


_ATEN_NOISE = re.compile(r'at::native::|\(anonymous namespace\)::|binary_internal::|c10::|'
                         r'at::TensorIteratorBase&')
_ATEN_GENERIC = ('vectorized_elementwise_kernel', 'unrolled_elementwise_kernel',
                 'elementwise_kernel', 'reduce_kernel')
_ATEN_WORK = re.compile(r'(\w*(?:Functor|_functor|KernelImpl|_kernel_cuda|_cuda_kernel|'
                        r'_forward_kernel|_backward_kernel|_kernel_impl|Ops)\w*(?:<[\w, ]*>)?)')
# wrappers of a binary functor: tensor with tensor, or with a scalar
_ATEN_WRAPPERS = {'BinaryFunctor': '', 'AUnaryFunctor': ' by a scalar',
                  'BUnaryFunctor': ' by a scalar'}


def short_kernel_name(name: str) -> str:
    """A CUDA kernel's name as a table shows it: ATen's generic elementwise
    and reduction kernels by the work they do (their functor) and the
    element types of its lambda, other kernels without their argument list.
    ``vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float,
    float, at::native::binary_internal::MulFunctor<float> >, ...>(...)``:
    ``vectorized: MulFunctor<float>``."""
    text = _ATEN_NOISE.sub('', name.removeprefix('void ')).strip()
    head = re.match(r'[\w:]+', text)
    if head and head.group(0) in _ATEN_GENERIC:
        found = _ATEN_WORK.findall(text)
        works = [w for w in found if not w.startswith(tuple(_ATEN_WRAPPERS))]
        wrapper = next((tag for w in found for key, tag in _ATEN_WRAPPERS.items()
                        if w.startswith(key)), '')
        # the element types of its functor's lambda, not the index lambda's (int)
        types = [t for t in re.findall(r'lambda\(([\w, ]+)\)', text) if t != 'int']
        kind = head.group(0).replace('_elementwise', '').replace('_kernel', '')
        if works:
            return (f'{kind}: {works[-1]}{wrapper}' + (f' ({types[-1]})' if types else ''))
    return _before_arguments(text) or name


def _before_arguments(text: str) -> str:
    """``text`` up to its argument list: the first '(' outside template brackets."""
    depth = 0
    for i, char in enumerate(text):
        depth += {'<': 1, '>': -1}.get(char, 0)
        if char == '(' and depth == 0:
            return text[:i].strip()
    return text.strip()


def format_table(summary: dict) -> str:
    """The summary as Markdown for the benchmark notes: the kernels, then
    the ATen ops where they carry a roofline, then the whole call."""
    unit = 'kernel (device time)' if summary['activity'] == 'cuda' else 'event (CPU self time)'
    lines = [f'{summary["device"]}: {summary["total_ms"]:.3f} ms in '
             f'{summary["num_kernel_names"]} {unit} names; the top '
             f'{len(summary["kernels"])} take {summary["listed_ms"]:.3f} ms', '',
             markdown_table((unit, 'calls', 'ms', 'share', 'roofline ms'),
                            [(short_kernel_name(row['name']), f'{row["count"]:g}',
                              _ms(row['ms']), f'{row["share"]:.1%}', _ms(row['roofline_ms']))
                             for row in summary['kernels']])]
    if summary['activity'] == 'cuda' and summary['ops']:
        lines += ['', markdown_table(('ATen op (its kernels)', 'calls', 'ms', 'roofline ms'),
                                     [(row['name'], f'{row["count"]:g}', _ms(row['ms']),
                                       _ms(row['roofline_ms'])) for row in summary['ops']]),
                  f'\nkernel time outside ATen ops (Triton\'s): '
                  f'{summary["outside_ops_ms"]:.3f} ms']
    call = summary['call']
    if call:
        peak = summary['peak']
        at = f' at {peak["name"]}\'s peak' if peak else ' (no peak for this device)'
        lines.append(f'\nwhole call: {call["bytes"] / 1e9:.3g} GB, {call["flops"] / 1e12:.3g} '
                     f'TFLOP ({call["half_flops"] / 1e12:.3g} with 16-bit operands); roofline'
                     f'{at}: {_ms(call["roofline_ms"])} ms; measured / roofline: '
                     + ('-' if call['over_roofline'] is None else f'{call["over_roofline"]:.1f}x'))
    return '\n'.join(lines)


# ---------------------------------------------------------------- the cases



class Case(NamedTuple):
    """A call to profile, the bytes and FLOPs to price it by, and what it is."""
    fn: Callable[[], object]
    costs: Dict[str, OpCost]
    note: str


def global_branches(device, implementation: str = 'torch', operand_dtype: str = 'bfloat16',
                    arch: str = 'm3', memory_cfg: Optional[dict] = None
                    ) -> List[Tuple[int, torch.nn.Module]]:
    """The global branches of ConvNeur-``arch`` with these memory settings
    (over ``memory_cfg``'s), on ``device``, with the stage of each."""
    return stage_branches(convneur_backbone(
        arch, device, memory_cfg=dict(memory_cfg or {}, implementation=implementation,
                                      operand_dtype=operand_dtype)))


def _bf16(device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def branches_inference_case(implementation: str, batch: int = 128, device='cuda',
                            size: int = M3_SIZE, arch: str = 'm3',
                            split: Optional[int] = None) -> Case:
    """One call of ``arch``'s four branches with bf16 operands, under bf16
    autocast, through ``implementation`` ('torch' or 'triton': CUDA only); ``split``
    as ``tiles.forced_column_blocks``."""
    if implementation == 'triton' and not is_cuda(device):
        raise ValueError("the 'triton' cases need a CUDA device")
    from convneur_mm.models.layers.memory_ops.kernels.tiles import forced_column_blocks
    branches = global_branches(device, implementation, arch=arch)
    inputs = branch_inputs(branches, batch, size, device)

    def call():
        with torch.inference_mode(), _bf16(device), forced_column_blocks(split):
            for (_, branch), x in zip(branches, inputs):
                branch(x)

    costs = count_costs(call)
    blocks = {None: '', 0: ', rows in one column block', 1: ', rows in two column blocks'}
    note = (f'the four global branches of {arch.upper()}, batch {batch} at {size}², '
            f'bf16 operands, {implementation}{blocks[split]}')
    if implementation == 'triton':
        costs, note = _priced_kernels(call, costs, device, note)
    return Case(call, costs, note)


def _priced_kernels(call: Callable[[], object], costs: Dict[str, OpCost], device,
                    note: str) -> Tuple[Dict[str, OpCost], str]:
    """``with_kernel_costs``; where pricing the kernels fails, the operators'
    counts as they are and the reason in the note: the profile still runs."""
    try:
        return with_kernel_costs(call, costs, device), note
    except Exception as error:  # noqa: B902 - a GPU run's time is worth more than its pricing
        return costs, f'{note}; kernels not priced ({type(error).__name__}: {str(error)[:200]})'


def branches_training_case(batch: int = 128, device='cuda', size: int = M3_SIZE,
                           implementation: str = 'torch') -> Case:
    """One bf16 training step of the four branches: forward and backward
    under bf16 autocast, bf16 operands, through ``implementation`` ('torch', or
    'triton': the Triton kernels and their backward kernels; CUDA only)."""
    if implementation == 'triton' and not is_cuda(device):
        raise ValueError("the 'training_triton' case needs a CUDA device")
    branches = global_branches(device, implementation)
    inputs = branch_inputs(branches, batch, size, device)
    params = [p for _, branch in branches for p in branch.parameters()]

    def call():
        for p in params:
            p.grad = None
        with _bf16(device):
            loss = sum(branch(x).float().sum() for (_, branch), x in zip(branches, inputs))
        loss.backward()

    costs = count_costs(call)
    note = (f'one training step (forward + backward) of the four global branches of M3, '
            f'batch {batch} at {size}², bf16 autocast and operands, {implementation}')
    if implementation == 'triton':
        costs, note = _priced_kernels(call, costs, device, note)
    return Case(call, costs, note)


CASES = {
    'triton': lambda **kw: branches_inference_case('triton', **kw),
    'torch': lambda **kw: branches_inference_case('torch', **kw),
    'training': branches_training_case,
    'training_triton': lambda **kw: branches_training_case(implementation='triton', **kw),
    'triton_m4': lambda **kw: branches_inference_case('triton', arch='m4', **kw),
    'triton_m4_one_block': lambda **kw: branches_inference_case('triton', arch='m4', split=0,
                                                                **kw),
    'torch_m4': lambda **kw: branches_inference_case('torch', arch='m4', **kw),
}


def profile_case(name: str, *, device, batch: int = 128, size: int = M3_SIZE,
                 warmup: int = 2, top: int = 25, trace_path: Optional[str] = None) -> dict:
    """``profile_kernels`` of one of ``CASES``, with its costs and note.

    Args:
        name: a key of ``CASES``.
        device: where it runs ('triton' needs CUDA).
        batch, size: images and their side (the GPU script: 128 and 224;
            the dry mode: a tiny batch).
        warmup, top, trace_path: see ``profile_kernels``.
    """
    if name not in CASES:
        raise ValueError(f'case must be one of {tuple(CASES)}, got {name!r}')
    case = CASES[name](batch=batch, device=device, size=size)
    summary = profile_kernels(case.fn, device=device, warmup=warmup, top=top, costs=case.costs,
                              trace_path=trace_path)
    summary.update(case=name, note=case.note, batch=batch, size=size)
    return summary


def kernel_rooflines(batch: int = 128, size: Union[int, Tuple[int, int]] = M3_SIZE,
                     peak: DevicePeak = PEAKS[0], training: bool = False,
                     one_program: bool = False, arch: str = 'm3',
                     memory_cfg: Optional[dict] = None) -> List[dict]:
    """The Triton kernels that ``arch``'s four global branches launch with bf16
    operands, in one inference call or (``training``) one training step, per
    stage: GB, GFLOP and roofline ms on ``peak``; at ``batch`` images of
    ``size`` (a side, or (H, W)), with ``memory_cfg``'s memory settings (a
    config's chunk size and ``max_lr``); with ``one_program``, the
    chunk gradients and the chunk read's backward as one program per chunk
    (``tiles.REPLACES``). Recorded
    on meta tensors for sm_90 (``with_kernel_costs``): no GPU runs, and none
    is needed; triton must not be in its interpreter."""
    from convneur_mm.models.layers.memory_ops.kernels.tiles import REPLACES, forced_tiles_of
    one_program_options = {kernel: {} for kernel in REPLACES} if one_program else {}
    branches = global_branches('meta', implementation='triton', arch=arch, memory_cfg=memory_cfg)
    rows = []
    for (stage, branch), x in zip(branches, branch_inputs(branches, batch, size, 'meta')):
        def call(branch=branch, x=x):
            with forced_tiles_of(one_program_options):
                if training:  # the forward and backward kernels
                    branch(x.requires_grad_()).float().sum().backward()
                    return
                with torch.inference_mode():  # as the 'triton' case calls them
                    branch(x)
        costs = with_kernel_costs(call, {}, 'meta')
        rows += [dict(stage=stage + 1, kernel=name, gb=cost.bytes / 1e9, gflop=cost.flops / 1e9,
                      roofline_ms=cost.roofline_s(peak) * 1e3, bound=_bound(cost, peak))
                 for name, cost in costs.items()]
    return rows


def _bound(cost: OpCost, peak: DevicePeak) -> str:
    return 'bytes' if cost.bytes / peak.bandwidth >= cost.roofline_s(peak) else 'products'


def job_shapes(job: str) -> dict:
    """``kernel_rooflines``' arch, memory settings, batch and (H, W) of a
    real config's training (``throughput.JOBS``): its backbone's, its per-GPU
    batch and its largest training image."""
    from benchmarks.training.throughput import JOBS, image_sizes
    from convneur_mm.apis.launch import load_config
    cfg = load_config(JOBS[job].config)
    backbone = cfg.model.backbone
    return dict(arch=backbone.arch, memory_cfg=dict(backbone.get('memory_cfg') or {}),
                batch=cfg.train_dataloader.batch_size, size=tuple(image_sizes(cfg)[0]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rooflines`` case's options (the profile itself is the ``memory``
    case's ``profile`` section: it needs the GPU)."""
    from benchmarks.training.throughput import JOBS
    parser.add_argument('--arch', default='m3', choices=('m1', 'm2', 'm3', 'm4'))
    parser.add_argument('--batch', type=positive_int, default=None, help='default: 128')
    parser.add_argument('--size', type=positive_int, default=M3_SIZE)
    parser.add_argument('--job', choices=sorted(JOBS),
                        help="a real config's shapes in place of --arch and --size: its "
                             "backbone, memory settings, per-GPU batch (unless --batch) and "
                             "largest training image")
    parser.add_argument('--peak', choices=[p.name for p in PEAKS], default=PEAKS[0].name)
    parser.add_argument('--training', action='store_true',
                        help='a training step\'s kernels (forward and backward)')
    parser.add_argument('--one-program', action='store_true',
                        help='the chunk gradients as one program per chunk, forward and backward')


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``kernel_rooflines`` printed as a table (no GPU needed; a dry run: batch 2)."""
    peak = next(p for p in PEAKS if p.name == args.peak)
    shapes = job_shapes(args.job) if args.job else dict(arch=args.arch, size=args.size,
                                                        batch=128, memory_cfg=None)
    batch = 2 if args.dry_run else args.batch or shapes['batch']
    if args.job:
        print(f"{args.job}: ConvNeur-{shapes['arch'].upper()}, batch {batch} at "
              f"{shapes['size'][0]}x{shapes['size'][1]}, memory {shapes['memory_cfg']}\n")
    rows = kernel_rooflines(batch, shapes['size'], peak, args.training, args.one_program,
                            shapes['arch'], shapes['memory_cfg'])
    print(markdown_table(('stage', 'kernel', 'GB', 'GFLOP', f'roofline ms ({peak.name})', 'bound'),
                         [(r['stage'], r['kernel'], f'{r["gb"]:.3f}', f'{r["gflop"]:.1f}',
                           f'{r["roofline_ms"]:.3f}', r['bound']) for r in rows]))
    print(f'\nall kernels: {sum(r["roofline_ms"] for r in rows):.3f} ms at {peak.name}\'s peak')
    return dict(peak=peak.name, rows=rows)
