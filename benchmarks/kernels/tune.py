"""Choose the memory kernels' launch options by timing them on the GPU they
run on, and say where they beat the PyTorch path.

For one stage's shapes (``bytes.backbone_shapes``) each kernel of
``tiles.KERNEL_NAMES`` and the projections' two (``tiles.PROJECTION_KERNELS``)
is tuned by coordinate descent from the options it launches with now: one
option at a time (BM, BH, num_warps, num_stages and programs_per_sm,
persistent programs; the projections' ``PROJECTION_AXES``) takes
each value of ``AXES`` while the others stay, the fastest is kept when it
gains at least ``MIN_GAIN``, and the axes are walked again until a round gains
nothing (or ``rounds`` end). A kernel runs in the call that launches it
(``OP_OF``): the forward kernels in the operation's forward, the backward
kernels in a training step of it, the kernels tuned before it launching with
their chosen options; on CUDA its own launches are timed, by the profiler
(``kernel_seconds``). Each candidate's
outputs must agree with the start's (``agrees``): a configuration
that compiles but computes something else is refused, as is one that fails to
compile (shared memory, registers); rows past ``tiles.row_limit`` are not
tried. A kernel that replaces others (``tiles.REPLACES``: one program per
chunk for the chunk gradients and the read's backward) is tuned after them,
and kept (``TunedTile`` entries make it run in their place) only
where its chosen options compute what they compute and beat their time by
``MIN_GAIN``. The PyTorch path of each call is timed beside it
(``torch_ms``), the evidence ``implementation='auto'`` needs per operation. On CUDA
a call that launches a kernel known to fault there (``kernels.CUDA_FAULTS``)
is left out with its kernels (``faulting_calls``), and said so.

    python -m benchmarks.run tune [--arch m3] [--stage 0]
        [--batch 128] [--operand-dtype bfloat16] [--json FILE] [--limit-s 300]
    python -m benchmarks.run tune --job upernet-m4  # a real config's stage 1
    TRITON_INTERPRET=1 python -m benchmarks.run tune --dry-run  # a CPU

``--job`` takes a real config's shapes (its per-GPU batch, largest training
image and memory settings); where its ``max_lr`` makes the read decomposed
(16-bit operands below ``dispatch.DECOMPOSE_BELOW_MAX_LR``: the COCO and
ADE20K configs) it tunes the decomposed read's kernels, whose entries are
their own kind (``TunedTile.decomposed``), and nothing else.

It prints each kernel's default and chosen options with their times, the
chosen ones as ``kernels.tuned.TunedTile`` entries to record in
``TUNED_TILES``, and the write and read's times through either path as
``MeasuredPath`` entries, by which ``implementation='auto'`` decides
(``MEASURED_PATHS``); the PyTorch steps use the closed-form backward (the
one that moves fewer bytes). ``--dry-run`` runs the same search on a CPU in Triton's
interpreter at tiny shapes over two values per axis: it checks the search,
not the options (the interpreter ignores warps and stages).
"""
import argparse
import functools
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from benchmarks.common.record import Record, UsageError
from benchmarks.common.subjects import describe_error
from benchmarks.kernels.profile import device_peak, profile_kernels, total_cost, with_kernel_costs
from benchmarks.memory.bytes import (MemoryShape, backbone_shapes, flat_inputs, projection_inputs,
                                     write_read_inputs)
from convneur_mm.analysis.timing import is_cuda, median, time_calls
from convneur_mm.models.layers.memory_ops.kernels import cuda_fault
from convneur_mm.models.layers.memory_ops.kernels.launcher import target_arch
from convneur_mm.models.layers.memory_ops.kernels.tiles import (PROJECTION_KERNELS,
                                                                PROJECTION_OPTIONS, REPLACES,
                                                                block_width, column_blocks,
                                                                forced_tiles, forced_tiles_of,
                                                                kernel_options, row_limit,
                                                                tile_config)
from convneur_mm.models.layers.memory_ops.kernels.tuned import (OPERAND_DTYPE_NAMES, MeasuredPath,
                                                                TunedTile, dtype_name)
from convneur_mm.utils.cli import positive_float, positive_int

AXES = {'BM': (16, 32, 64, 128), 'BH': (16, 32, 64, 128), 'num_warps': (4, 8),
        'num_stages': (1, 2, 3, 4), 'programs_per_sm': (0, 1, 2, 4), 'BO': (0, 32, 64)}
# the projections' axes: no hidden units, no persistent programs; the split as the
# others'; the backward's output block (BO) too
PROJECTION_AXES = tuple(option for option in PROJECTION_OPTIONS if option in AXES)
DRY_AXES = {'BM': (16, 32), 'BH': (16, 32), 'num_warps': (4, ), 'num_stages': (2, ),
            'programs_per_sm': (0, 2), 'BO': (0, 16)}
DRY_SHAPE = MemoryShape(batch=2, tokens=41, chunk=20, heads=1, head_dim=16)
MIN_GAIN = 0.03  # a smaller gain is not worth an entry that only this card measured
# the call that launches each kernel: an operation's forward or its training step
OP_OF = {'read': 'read', 'read_backward_rows': 'read step', 'read_backward_cols': 'read step',
         'grads_rows': 'write', 'grads_cols': 'write', 'grads_backward_rows': 'write step',
         'grads_backward_cols': 'write step', 'project': 'project',
         'project_backward': 'project step', 'grads_chunk': 'write',
         'grads_backward_chunk': 'write step', 'read_backward_chunk': 'read step'}
OPERAND_DTYPES = {name: getattr(torch, name) for name in OPERAND_DTYPE_NAMES}
# the kernels a decomposed read launches (a read's own kind of tuned entries)
DECOMPOSED_KERNELS = ('read', 'read_backward_rows', 'read_backward_cols', 'read_backward_chunk')


def time_kernel(fn: Callable[[], object], device='cpu', repeats: int = 5) -> float:
    """Median seconds of a call that launches a few kernels: on CUDA
    ``triton.testing.do_bench`` (L2 flushed before each call, as many calls as
    fit its 100 ms), elsewhere ``time_calls`` after one untimed call.

    Args:
        fn: the work to time, called without arguments.
        device: see ``time_call``.
        repeats: timed calls off CUDA.
    """
    if is_cuda(device):
        from triton.testing import do_bench
        with torch.cuda.device(torch.device(device)):
            return do_bench(fn, warmup=25, rep=100, return_mode='median') / 1e3
    return median(time_calls(fn, repeats, device, warmup=1))


def faulting_calls(on_cuda: bool) -> Dict[str, str]:
    """The calls (``OP_OF``'s) that launch a kernel known to fault on CUDA
    GPUs (``kernels.cuda_fault``), with why; none off CUDA. A step launches
    its forward's kernels too."""
    if not on_cuda:
        return {}
    found = {}
    for call in dict.fromkeys(OP_OF.values()):
        why = cuda_fault(k for k, c in OP_OF.items() if call in (c, f'{c} step'))
        if why is not None:
            found[call] = why
    return found


def agrees(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], tol: float) -> bool:
    """Whether each result is within ``tol`` of its reference's largest
    entry (max-relative), finite, and of the same shape."""
    for a, b in zip(got, want):
        if a.shape != b.shape or not torch.isfinite(a).all():
            return False
        scale = b.abs().max().clamp_min(1e-30)
        # not `> tol`: a NaN reference (a start that miscomputes) must refuse too
        if not ((a.double() - b.double()).abs().max() / scale).item() <= tol:
            return False
    return len(got) == len(want)


class Calls(NamedTuple):
    """The calls of one stage: each returns its results (outputs, gradients)."""
    triton: Dict[str, Callable[[], List[torch.Tensor]]]
    torch: Dict[str, Callable[[], List[torch.Tensor]]]


def stage_calls(shape: MemoryShape, operand_dtype: torch.dtype, device,
                seed: int = 0, decomposed: bool = False) -> Calls:
    """The write's, the read's and the projections' forward ('write',
    'read', 'project') and training steps ('write step', 'read step',
    'project step') at ``shape`` (the projections at the backbone's default
    ``max_lr``), through the Triton kernels and through the PyTorch path
    (the steps with the closed-form backward), on the same inputs. The
    Triton write writes w1's and w2's gradients in the operand dtype, as
    inference does. ``decomposed``: the read is a decomposed one
    (``decomposed_read``), its states an update on W_0."""
    from convneur_mm.models.backbones.convneur import ConvNeur
    from convneur_mm.models.layers.memory_ops import (chunk_grads_closed_form, chunk_grads_triton,
                                                      read_closed_form, read_triton)
    from convneur_mm.models.layers.memory_ops.project import (project_closed_form, project_torch,
                                                              project_triton)
    write, read, cotangents = write_read_inputs(shape, device=device, seed=seed)
    if write is None:
        raise ValueError(f'{shape} writes no chunk: pick a stage with more tokens than a chunk')
    read_options, read_grads = {}, flat_inputs(read)
    if decomposed:
        read, base, carry = decomposed_read(read, shape.heads, seed)
        read_options, read_grads = dict(base=base, carry=carry), flat_inputs(read) + [
            base.w1, base.w2, carry]
    x, weights, bars = projection_inputs(shape, device=device, seed=seed)
    projected = (x, weights, shape.writes, shape.chunk, ConvNeur.default_memory_cfg['max_lr'])
    # the pool's logits bias shifts a feature's logits alike over a chunk's rows, which its
    # softmax ignores: its gradient is zero but for rounding, no result to compare
    projection_grads = [x] + [t for name, t in weights._asdict().items() if name != 'logits_bias']

    def calls(write_fn, grads_fn, read_fn, project_fn, project_step_fn
              ) -> Dict[str, Callable[[], List[torch.Tensor]]]:
        def forward(fn, args) -> Callable[[], List[torch.Tensor]]:
            def call():
                with torch.no_grad():
                    out = fn(*args, operand_dtype=operand_dtype)
                return list(out) if isinstance(out, tuple) else [out]
            return call

        def step(fn, args, grads_of: List[torch.Tensor], bars) -> Callable[[], List[torch.Tensor]]:
            def call():
                out = fn(*args, operand_dtype=operand_dtype)
                outs = list(out) if isinstance(out, tuple) else [out]
                return list(torch.autograd.grad(outs, grads_of, bars))
            return call

        read_fn = functools.partial(read_fn, **read_options)
        return {'write': forward(write_fn, write), 'read': forward(read_fn, read),
                'write step': step(grads_fn, write, flat_inputs(write), cotangents[:3]),
                'read step': step(read_fn, read, read_grads, cotangents[3:]),
                'project': forward(project_fn, projected),
                'project step': step(project_step_fn, projected, projection_grads, bars)}

    # the write in inference as the memory runs it: w1's and w2's gradients in the
    # operand dtype their 16-bit states take
    write_triton = functools.partial(chunk_grads_triton, grads_dtype=operand_dtype)
    return Calls(calls(write_triton, chunk_grads_triton, read_triton, project_triton,
                       project_triton),
                 calls(chunk_grads_closed_form, chunk_grads_closed_form, read_closed_form,
                       project_torch, project_closed_form))


def decomposed_read(read: tuple, heads: int, seed: int = 0) -> Tuple[tuple, object, torch.Tensor]:
    """A stage's read inputs (``write_read_inputs``) as a decomposed read's:
    the states' w1 and w2 an update 2e-3 of their scale (``max_lr`` 1e-3's
    order), W_0 per head at the states' scale, a_t in [0.5, 1); leaves."""
    from convneur_mm.models.layers.memory_ops import MemoryWeights
    weights, x = read
    gen = torch.Generator().manual_seed(seed + 1)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(x.device).requires_grad_()

    delta = MemoryWeights(leaf(weights.w1 * 2e-3), leaf(weights.w2 * 2e-3), weights.g)
    base = MemoryWeights(*(leaf(torch.randn((heads, *w.shape[1:]), generator=gen) *
                                w.shape[1]**-0.5) for w in (weights.w1, weights.w2)), None)
    carry = leaf(0.5 + 0.5 * torch.rand(weights.w1.shape[0], generator=gen))
    return (delta, x), base, carry


class Trial(NamedTuple):
    options: Dict[str, int]
    seconds: Optional[float]  # None: refused
    error: Optional[str] = None


def kernel_seconds(kernel: str, call: Callable[[], object], device, repeats: int = 5,
                   by_kernel: bool = True) -> Optional[float]:
    """Seconds of ``kernel``'s own launches in one ``call``, their device
    time under ``torch.profiler`` (so a kernel that is a small part of its
    call is timed alone; None where the profile names no such kernel); with
    ``by_kernel`` False, or off CUDA, the whole call's (``time_kernel``)."""
    if not (by_kernel and is_cuda(device)):
        return time_kernel(call, device, repeats)
    name = f'{kernel}_kernel'
    summary = profile_kernels(call, device=device, warmup=1, top=10**6, repeats=repeats)
    ms = sum(row['ms'] for row in summary['kernels']
             if row['name'] == name or row['name'].startswith(name + '_'))
    return ms / 1e3 if ms > 0 else None


def within_row_limit(axes: Dict[str, Sequence[int]], kernel: str, operand_dtype: torch.dtype,
                     arch: Optional[int]) -> Dict[str, Sequence[int]]:
    """``axes`` without the rows past ``tiles.row_limit`` on this GPU: a
    candidate there computes wrong results or faults, which ends the run."""
    limit = row_limit(kernel, operand_dtype, arch)
    if limit is None:
        return axes
    return dict(axes, BM=tuple(rows for rows in axes['BM'] if rows <= limit))


def with_split_axis(axes: Dict[str, Sequence[int]], start: Dict[str, int], tiles: dict,
                    head_dim: int) -> Tuple[Dict[str, Sequence[int]], Dict[str, int]]:
    """``axes`` and ``start`` with ``split`` (a row in one column block or
    two; the start's as its ``tiles`` hold it) where ``tiles.column_blocks``
    finds two blocks for ``head_dim`` features; elsewhere it changes nothing."""
    if column_blocks(head_dim)[1] == 0:
        return axes, start
    return dict(axes, split=(0, 1)), dict(start, split=int(tiles['BE'] > 0))


def kernel_start(kernel: str, shape: MemoryShape, operand_dtype: torch.dtype,
                 arch: Optional[int], axes: Dict[str, Sequence[int]], decomposed: bool = False
                 ) -> Tuple[Dict[str, Sequence[int]], Dict[str, int], int]:
    """The axes ``kernel``'s search walks at ``shape``, its start (the options
    it launches with now) and the width its entries name (``TunedTile.block_d``):
    a head's, or for the projections a whole row. Each kernel walks the axes
    it takes (``tiles.kernel_options``: the projections' ``PROJECTION_AXES``);
    ``decomposed``: a decomposed read's kernel."""
    kernel_axes = {axis: values for axis, values in axes.items()
                   if axis in kernel_options(kernel)}
    if kernel in PROJECTION_KERNELS:
        from convneur_mm.models.layers.memory_ops.project.triton import projection_tiles
        width = shape.heads * shape.head_dim
        config = projection_tiles(width, shape.heads, min(shape.chunk, shape.tokens), None, None,
                                  operand_dtype, kernel == 'project_backward', arch)
    else:
        width = shape.head_dim
        config = tile_config(kernel, width, shape.chunk, None, None, operand_dtype, decomposed,
                             arch)
        kernel_axes = within_row_limit(kernel_axes, kernel, operand_dtype, arch)
    kernel_axes, start = with_split_axis(kernel_axes, {axis: config[axis] for axis in kernel_axes},
                                         config, width)
    return kernel_axes, start, width


def tune_kernel(kernel: str, call: Callable[[], List[torch.Tensor]], start: Dict[str, int],
                chosen: Dict[str, Dict[str, int]], device, tol: float,
                axes: Dict[str, Sequence[int]] = AXES, rounds: int = 2,
                deadline: Optional[float] = None, repeats: int = 5) -> List[Trial]:
    """The trials of one kernel's coordinate descent from ``start``, the
    start first; the others' ``chosen`` options forced throughout. Each
    candidate's results are compared with the start's. Stops early at ``deadline`` (a
    ``time.monotonic`` value). ``repeats``: timed calls off CUDA."""
    trials: List[Trial] = []
    with forced_tiles_of({k: v for k, v in chosen.items() if k != kernel}):
        try:
            with forced_tiles(kernel, **start):
                want = [t.detach().clone() for t in call()]
        except Exception as error:  # noqa: B902 - reported, the next kernel is tuned
            return [Trial(dict(start), None, describe_error(error))]

        def trial(options: Dict[str, int], by_kernel: bool) -> Trial:
            try:
                with forced_tiles(kernel, **options):
                    got = call()
                    if not agrees(got, want, tol):
                        return Trial(options, None, 'results differ from the start\'s')
                    seconds = kernel_seconds(kernel, call, device, repeats, by_kernel)
                    if seconds is None:
                        return Trial(options, None, 'the profile named none of its launches')
                    return Trial(options, seconds)
            except Exception as error:  # noqa: B902 - a compile failure refuses a candidate
                return Trial(options, None, describe_error(error))

        # one measure for every candidate: the kernel's own launches where the
        # start's profile names them (a profiler that cannot run, or names none:
        # the whole call)
        by_kernel = is_cuda(device)
        best = trial(dict(start), by_kernel)
        if by_kernel and best.seconds is None:
            by_kernel = False
            best = trial(dict(start), by_kernel)
        trials.append(best)
        if best.seconds is None:
            return trials
        for _ in range(rounds):
            gained = False
            for axis, values in axes.items():
                for value in values:
                    if deadline is not None and time.monotonic() > deadline:
                        return trials
                    options = dict(best.options, **{axis: value})
                    if any(t.options == options for t in trials):
                        continue
                    result = trial(options, by_kernel)
                    trials.append(result)
                    if (result.seconds is not None
                            and result.seconds < best.seconds * (1 - MIN_GAIN)):
                        best, gained = result, True
            if not gained:
                break
    return trials


def replaced_seconds(kernel: str, call: Callable[[], object],
                     chosen: Dict[str, Dict[str, int]], device,
                     repeats: int = 5) -> Optional[float]:
    """Seconds of the kernels that ``kernel`` replaces
    (``tiles.REPLACES``), at their ``chosen`` options: their own launches
    summed on CUDA (None where the profile names one of them not), else the
    whole call's, as ``kernel`` itself is timed."""
    with forced_tiles_of(_replaced_forced(kernel, chosen)):
        if not is_cuda(device):
            return time_kernel(call, device, repeats)
        times = [kernel_seconds(name, call, device, repeats) for name in REPLACES[kernel]]
    return None if None in times else sum(times)


def agrees_with_replaced(kernel: str, call: Callable[[], List[torch.Tensor]],
                         options: Dict[str, int], chosen: Dict[str, Dict[str, int]],
                         tol: float) -> bool:
    """Whether ``kernel`` at ``options`` computes what the kernels it
    replaces compute at their ``chosen`` options (``agrees``): its own
    candidates are checked only against its own start."""
    with forced_tiles_of(_replaced_forced(kernel, chosen)):
        want = [t.detach().clone() for t in call()]
        with forced_tiles(kernel, **options):  # a forced replacing kernel runs
            return agrees(call(), want, tol)


def _replaced_forced(kernel: str, chosen: Dict[str, Dict[str, int]]
                     ) -> Dict[str, Dict[str, int]]:
    """``chosen`` but ``kernel``, with the kernels it replaces forced (their
    chosen options, or none): they run even where a tuned entry already
    runs ``kernel`` in their place."""
    forced = {k: v for k, v in chosen.items() if k != kernel}
    forced.update({name: chosen.get(name, {}) for name in REPLACES[kernel]})
    return forced


def best_trial(trials: List[Trial]) -> Trial:
    """The fastest accepted trial that beats the first (the start) by
    ``MIN_GAIN``, else the first."""
    start = trials[0]
    timed = [t for t in trials if t.seconds is not None]
    fastest = min(timed, key=lambda t: t.seconds) if timed else start
    if start.seconds is None or fastest.seconds < start.seconds * (1 - MIN_GAIN):
        return fastest
    return start


def tune_stage(shape: MemoryShape, operand_dtype: torch.dtype, device,
               kernels: Sequence[str] = tuple(OP_OF), axes: Dict[str, Sequence[int]] = AXES,
               rounds: int = 2, limit_s: Optional[float] = None, repeats: int = 5,
               on_progress: Optional[Callable[[Dict], None]] = None,
               decomposed: bool = False) -> Dict:
    """Tune ``kernels`` in order at ``shape`` (see the module docstring).

    Args:
        shape: the stage's memory.
        operand_dtype: the products' operand dtype.
        device: where to run (CUDA; a CPU runs the interpreter).
        kernels: the kernels to tune, in order (but those that replace
            others, ``tiles.REPLACES``, last).
        axes: the values each option may take.
        rounds: walks over the axes at most.
        limit_s: seconds after which no further candidate is tried.
        repeats: timed calls per candidate off CUDA (``time_kernel``).
        on_progress: called with the results so far after each kernel (a
            run that fails later keeps what it found).
        decomposed: tune a decomposed read's kernels (``DECOMPOSED_KERNELS``,
            of ``kernels``; their entries are ``TunedTile.decomposed`` ones)
            and measure no path (``MeasuredPath`` has no decomposed kind).

    Returns:
        A JSON-able dict: ``kernels`` (per kernel: ``start``, ``chosen``,
        their ms, ``trials``), ``calls`` (per call: the Triton kernels' ms at
        the default and at the chosen options, the PyTorch path's ms, and
        the kernels' GB, GFLOP and roofline ms at the card's peak,
        ``profile.device_peak``; None for a card it does not know),
        ``entries`` (the chosen options as ``TunedTile`` source lines, where
        they differ from the start) and ``paths`` (the write and read's
        inference and training times through either path, as
        ``MeasuredPath`` source lines). On a CPU (the interpreter) the last
        two stay empty: they describe a GPU. ``stopped_at`` names the kernel
        whose search the time limit ended, if any; ``error`` an error of the
        final timings.
    """
    device = torch.device(device)
    # a kernel that replaces others is compared with them at their chosen options
    if decomposed:
        kernels = [kernel for kernel in kernels if kernel in DECOMPOSED_KERNELS]
    kernels = sorted(kernels, key=lambda kernel: kernel in REPLACES)
    deadline = None if limit_s is None else time.monotonic() + limit_s
    calls = stage_calls(shape, operand_dtype, device, decomposed=decomposed)
    # a fault ends the process and every result with it: such calls are left out
    skipped = faulting_calls(is_cuda(device))
    calls = Calls(*({name: call for name, call in group.items() if name not in skipped}
                    for group in calls))
    kernels = [kernel for kernel in kernels if OP_OF[kernel] not in skipped]
    if decomposed:  # only the read's calls: no path is measured
        calls = Calls(*({name: call for name, call in group.items() if name.startswith('read')}
                        for group in calls))
    tol = 1e-5 if operand_dtype == torch.float32 else 2e-3
    arch = target_arch(device)
    result: Dict = {'arch': arch, 'kernels': {}, 'calls': {}, 'entries': [], 'paths': [],
                    'tiles': [], 'measured_paths': [], 'skipped': skipped, 'stopped_at': None,
                    'error': None}
    default_ms: Dict[str, Optional[float]] = {}
    for name, call in calls.triton.items():  # a call that fails here is recorded, not fatal
        try:
            default_ms[name] = time_kernel(call, device, repeats) * 1e3
        except Exception as error:  # noqa: B902 - reported; its kernels' trials say more
            default_ms[name] = None
            result.setdefault('call_errors', {})[name] = describe_error(error)
    if on_progress is not None:
        on_progress(result)
    chosen: Dict[str, Dict[str, int]] = {}
    for kernel in kernels:
        kernel_axes, start, width = kernel_start(kernel, shape, operand_dtype, arch, axes,
                                                 decomposed)
        call = calls.triton[OP_OF[kernel]]
        trials = tune_kernel(kernel, call, start, chosen, device, tol, kernel_axes, rounds,
                             deadline, repeats)
        best = best_trial(trials)
        record = result['kernels'][kernel] = {
            'call': OP_OF[kernel], 'start': start, 'chosen': best.options,
            'start_ms': _ms(trials[0].seconds), 'chosen_ms': _ms(best.seconds),
            'trials': [dict(t.options, ms=_ms(t.seconds), error=t.error) for t in trials]}
        record_entry = best.options != start
        if kernel in REPLACES:  # it runs, and gets an entry, only where it beats those it replaces
            try:
                replaced = replaced_seconds(kernel, call, chosen, device, repeats)
            except Exception as error:  # noqa: B902 - reported; then no entry
                replaced, record['error'] = None, describe_error(error)
            record['replaced_ms'] = _ms(replaced)
            try:
                record['agrees_with_replaced'] = (best.seconds is not None and
                                                  agrees_with_replaced(kernel, call, best.options,
                                                                       chosen, tol))
            except Exception as error:  # noqa: B902 - reported; the run goes on
                record['agrees_with_replaced'] = False
                record['error'] = describe_error(error)
            record_entry = record['replaces'] = (
                record['agrees_with_replaced'] and replaced is not None
                and best.seconds < replaced * (1 - MIN_GAIN))
        if kernel not in REPLACES or record_entry:
            chosen[kernel] = best.options
        if record_entry and arch is not None:
            # the projections have no hidden units (BH 16 stands for none) nor persistent programs
            none = dict(BH=16, programs_per_sm=0) if kernel in PROJECTION_KERNELS else {}
            options = {**none, **best.options}
            entry = TunedTile(kernel, arch, dtype_name(operand_dtype), block_width(width),
                              decomposed, **options)
            result['entries'].append(f'{entry!r},')
            result['tiles'].append(entry._asdict())
        if deadline is not None and time.monotonic() > deadline and not result['stopped_at']:
            result['stopped_at'] = kernel
        if on_progress is not None:
            on_progress(result)
    try:
        _time_calls(result, calls, chosen, default_ms, device, repeats)
    except Exception as error:  # noqa: B902 - a broken CUDA context: keep the search's results
        result['error'] = describe_error(error)
        return result
    if arch is not None and not decomposed:  # what implementation='auto' decides by
        paths = measured_paths(result['calls'], arch, operand_dtype,
                               torch.cuda.get_device_name(device), shape)
        result['paths'] = [f'{entry!r},' for entry in paths]
        result['measured_paths'] = [entry._asdict() for entry in paths]
    return result


def _time_calls(result: Dict, calls: Calls, chosen: Dict[str, Dict[str, int]],
                default_ms: Dict[str, Optional[float]], device, repeats: int) -> None:
    """``result['calls']``: each call through the chosen and the default
    options, through PyTorch, and its kernels' roofline."""
    with forced_tiles_of(chosen):
        tuned_ms = {name: time_kernel(call, device, repeats) * 1e3
                    for name, call in calls.triton.items()}
    peak = device_peak(device)
    for name, call in calls.triton.items():
        with forced_tiles_of(chosen):  # its kernels' bytes and FLOPs, from one more call
            cost = total_cost(with_kernel_costs(call, {}, device))
        result['calls'][name] = {
            'triton_default_ms': default_ms[name], 'triton_tuned_ms': tuned_ms[name],
            'torch_ms': time_kernel(calls.torch[name], device, repeats) * 1e3,
            'kernels_gb': cost.bytes / 1e9, 'kernels_gflop': cost.flops / 1e9,
            'roofline_ms': cost.roofline_s(peak) * 1e3 if peak else None}


def measured_paths(calls: Dict, arch: int, operand_dtype: torch.dtype, card: str,
                   shape: MemoryShape) -> List[MeasuredPath]:
    """``MeasuredPath`` entries from ``tune_stage``'s ``calls``: the
    write and read together, in inference and in a training step, through
    the tuned kernels and through PyTorch."""
    entries = []
    for training, names in ((False, ('write', 'read')), (True, ('write step', 'read step'))):
        if not all(name in calls for name in names):  # a call left out (``faulting_calls``)
            continue
        triton_ms, torch_ms = (sum(calls[name][key] for name in names)
                               for key in ('triton_tuned_ms', 'torch_ms'))
        entry = MeasuredPath(arch, dtype_name(operand_dtype), training, round(triton_ms, 3),
                             round(torch_ms, 3), f'an {card}, the write and read at batch '
                             f'{shape.batch}, {shape.tokens} tokens',
                             block_d=block_width(shape.head_dim))
        entries.append(entry)
    return entries


def apply_tuned(paths: Sequence[str]) -> Dict[str, int]:
    """Put the entries that ``tune`` records wrote (``--json``) into this
    process's ``TUNED_TILES`` and ``MEASURED_PATHS``, in place of the
    entries they measure again: how a run times the kernels as tuned,
    before anyone copies the entries into ``kernels/tuned.py``.

    Returns:
        How many tile and path entries were applied.

    Raises:
        ValueError: a file that is not a ``tune`` record, or entries that
            the tables' checks refuse.
    """
    import json

    from convneur_mm.models.layers.memory_ops.dispatch import check_measured_paths
    from convneur_mm.models.layers.memory_ops.kernels import tuned
    from convneur_mm.models.layers.memory_ops.kernels.tiles import check_tuned_tiles
    tiles: List[TunedTile] = []
    measured: List[MeasuredPath] = []
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        if record.get('case') != 'tune' or not isinstance(record.get('result'), dict):
            raise ValueError(f'{path} is not a record of the tune case')
        tiles += [TunedTile(**entry) for entry in record['result'].get('tiles', [])]
        measured += [MeasuredPath(**entry)
                     for entry in record['result'].get('measured_paths', [])]

    def replaced(table: tuple, entries: list) -> tuple:
        new = {e.key() for e in entries}
        return tuple(e for e in table if e.key() not in new) + tuple(entries)

    tile_table = replaced(tuned.TUNED_TILES, tiles)
    path_table = replaced(tuned.MEASURED_PATHS, measured)
    check_tuned_tiles(tile_table)
    check_measured_paths(path_table)
    tuned.TUNED_TILES, tuned.MEASURED_PATHS = tile_table, path_table
    return dict(tiles=len(tiles), measured_paths=len(measured))


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3


def format_report(result: Dict) -> str:
    """The kernels' and calls' tables, then the entries to record."""
    from convneur_mm.utils.tables import markdown_table

    def options(o: Dict[str, int]) -> str:
        persistent = (f", {o['programs_per_sm']} programs/SM" if o.get('programs_per_sm')
                      else '')
        hidden = f", BH {o['BH']}" if 'BH' in o else ''  # the projections have none
        outputs = f", BO {o['BO']}" if 'BO' in o else ''  # the projections' backward's
        return (f"BM {o['BM']}{hidden}{outputs}, {o['num_warps']} warps, "
                f"{o['num_stages']} stages" + persistent)

    def ms(value: Optional[float]) -> str:
        return 'refused' if value is None else f'{value:.3f}'

    kernels = [[name, k['call'], options(k['start']), ms(k['start_ms']), options(k['chosen']),
                ms(k['chosen_ms']), str(len(k['trials']))]
               for name, k in result['kernels'].items()]
    def verdict(k: Dict) -> str:
        if k['replaces']:
            return 'it replaces them'
        if k.get('error'):
            return f"they stay (the comparison failed: {k['error']})"
        if k['chosen_ms'] is not None and not k['agrees_with_replaced']:
            return 'they stay (its results differ from theirs)'
        return 'they stay'

    replacing = [f"{name}: {ms(k['chosen_ms'])} ms against {ms(k['replaced_ms'])} ms for "
                 f"the kernels it replaces: {verdict(k)}"
                 for name, k in result['kernels'].items() if 'replaces' in k]
    calls = [[name, ms(c['triton_default_ms']), ms(c['triton_tuned_ms']), ms(c['torch_ms']),
              '-' if c['roofline_ms'] is None else ms(c['roofline_ms'])]
             for name, c in result['calls'].items()]
    lines = [markdown_table(['kernel', 'timed through', 'default', 'ms', 'chosen', 'ms', 'tried'],
                            kernels), '',
             markdown_table(['call', 'Triton, default ms', 'Triton, tuned ms', 'PyTorch ms',
                             'kernels\' roofline ms'], calls), ''] + replacing
    if result['entries']:
        lines += ['TUNED_TILES entries:'] + ['    ' + e for e in result['entries']]
    elif result.get('arch') is None:
        lines.append('No entry: entries describe a GPU, and this run had none.')
    else:
        lines.append(f'No new entry: no candidate beat its start by {MIN_GAIN:.0%}.')
    for call, why in result.get('skipped', {}).items():
        lines.append(f'Left out: the {call} call and its kernels ({why}).')
    if result['stopped_at']:
        lines.append(f'The time limit ended the search at {result["stopped_at"]}: the kernels '
                     'after it kept their start.')
    if result['error']:
        lines.append(f'The final timings failed: {result["error"]}')
    if result['paths']:
        lines += ['', 'MEASURED_PATHS entries:'] + ['    ' + e for e in result['paths']]
    return '\n'.join(lines)


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming a model's stage and its operands (``stage_shape``),
    shared by the kernel cases."""
    parser.add_argument('--arch', default='m3')
    parser.add_argument('--stage', type=int, default=0, help='0-based stage whose shapes to use')
    parser.add_argument('--batch', type=positive_int, default=128)
    parser.add_argument('--operand-dtype', default='bfloat16', choices=sorted(OPERAND_DTYPES))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tune`` case's options."""
    add_stage_arguments(parser)
    from benchmarks.training.throughput import JOBS
    parser.add_argument('--kernels', nargs='+', default=list(OP_OF), choices=list(OP_OF))
    parser.add_argument('--job', choices=sorted(JOBS),
                        help="a real config's stage --stage in place of --arch and --batch: "
                             'its per-GPU batch, largest training image and memory settings; '
                             'a decomposed read (its max_lr) tunes that read\'s kernels only')
    parser.add_argument('--rounds', type=positive_int, default=2)
    parser.add_argument('--limit-s', type=positive_float, default=None,
                        help='stop trying candidates after this many seconds')


def stage_of_args(args: argparse.Namespace, case: str, does: str
                  ) -> Tuple[MemoryShape, torch.dtype, str]:
    """(shape, operand dtype, device) of a kernel case's options (``--arch``,
    ``--stage``, ``--batch``, ``--operand-dtype``): on CUDA, or in a dry run
    the tiny ``DRY_SHAPE`` in float16 in Triton's interpreter, which must be on.

    Raises:
        UsageError: no CUDA outside a dry run, no interpreter in one, or a
            stage the model does not have.
    """
    if args.dry_run:
        from convneur_mm.models.layers.memory_ops.kernels.availability import load_kernels
        if not load_kernels('read')[2]:  # triton reads TRITON_INTERPRET once, when it is imported
            raise UsageError(f'a dry run of {case} runs the kernels in Triton\'s interpreter: '
                             'start it with TRITON_INTERPRET=1 in the environment')
        return DRY_SHAPE, torch.float16, 'cpu'
    if not torch.cuda.is_available():
        raise UsageError(f'{case} {does} on a CUDA GPU; --dry-run checks it on a CPU')
    return stage_shape(args), OPERAND_DTYPES[args.operand_dtype], 'cuda'


def stage_shape(args: argparse.Namespace) -> MemoryShape:
    """The shape of ``--arch``'s stage ``--stage`` at ``--batch``.

    Raises:
        UsageError: a stage the model does not have.
    """
    shapes = backbone_shapes(args.arch, batch=args.batch)
    if not 0 <= args.stage < len(shapes):
        raise UsageError(f'--stage must be in [0, {len(shapes) - 1}]')
    return shapes[args.stage]


def job_stage(job: str, stage: int) -> Tuple[MemoryShape, float]:
    """A real config's (``profile.job_shapes``) memory at stage ``stage``
    and its ``max_lr``: its per-GPU batch, its largest training image's
    tokens there, its chunks and heads.

    Raises:
        UsageError: a stage the model does not have.
    """
    from benchmarks.kernels.profile import job_shapes
    from convneur_mm.models.backbones.convneur import ConvNeur
    shapes = job_shapes(job)
    settings = ConvNeur.arch_settings[shapes['arch']]
    if not 0 <= stage < len(settings['dims']):
        raise UsageError(f"--stage must be in [0, {len(settings['dims']) - 1}]")
    cfg = {**ConvNeur.default_memory_cfg, **shapes['memory_cfg']}
    height, width = shapes['size']
    tokens = (height // 4 // 2**stage) * (width // 4 // 2**stage)
    return MemoryShape(shapes['batch'], tokens, cfg['chunk_size'], cfg['heads'],
                       settings['memory_dim'] // cfg['heads']), cfg['max_lr']


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``tune_stage`` with the parsed options, its JSON rewritten after each
    kernel; a dry run is a CPU run in Triton's interpreter at tiny shapes,
    float16 (started with ``TRITON_INTERPRET=1``; with ``--job``, of that
    job's kind of read)."""
    from convneur_mm.models.layers.memory_ops.dispatch import DECOMPOSE_BELOW_MAX_LR
    shape, dtype, device = stage_of_args(args, 'tune', 'times the kernels')
    decomposed = False
    if args.job:
        job_shape, max_lr = job_stage(args.job, args.stage)
        shape = shape if args.dry_run else job_shape
        decomposed = dtype != torch.float32 and max_lr < DECOMPOSE_BELOW_MAX_LR
        where = ("a dry run's tiny shape" if args.dry_run else
                 "the config's batch and image, not --arch's or --batch's")
        print(f'{args.job}, stage {args.stage}: {shape} ({where}), max_lr {max_lr}: '
              + ("the decomposed read's kernels" if decomposed else 'the kernels asked for'))
    axes, repeats = (DRY_AXES, 1) if args.dry_run else (AXES, 5)
    settings = {'shape': shape._asdict(), 'job': args.job, 'decomposed': decomposed,
                'operand_dtype': dtype_name(dtype),
                'device': (torch.cuda.get_device_name() if device == 'cuda'
                           else 'cpu (Triton interpreter)'),
                'torch': torch.__version__, 'triton': _triton_version(), 'dry_run': args.dry_run}
    result = tune_stage(shape, dtype, device, args.kernels, axes, args.rounds, args.limit_s,
                        repeats, on_progress=lambda partial: record.write(
                            dict(partial, settings=settings)), decomposed=decomposed)
    print(format_report(result))
    return dict(result, settings=settings)
