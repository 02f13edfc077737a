"""What the Triton implementations share: argument checks, tiles, launches.

The product kernels have backward kernels (``launch_read_backward`` and the
chunk gradients' own), which recompute what the forward computed instead of
saving it. Inputs are float32 (features, and states where they train; the
scan kernel writes inference states that only products read in 16 bits);
``operand_dtype`` is the dtype of the products' operands, with float32
accumulation (float32 operands multiply in IEEE float32, not TF32).
"""
import contextlib
import functools
from typing import (Callable, ContextManager, Dict, Iterator, List, NamedTuple, Optional,
                    Sequence, Tuple)

import torch
from torch import Tensor

from ..common import LN_EPS, MemoryWeights, check_gelu_approximate
from .availability import (OPERAND_DTYPES, launches_skipped, load_kernels, unavailable_reason,
                           without_launches)


# the weights' passes walk a chunk's rows past its whole blocks in steps of
# tl.dot's least rows: 196 rows in 64-row blocks multiply 208 rows, not 256
TAIL_ROWS = 16


class Launch(NamedTuple):
    """One kernel launch as a wrapper makes it: ``kernel[grid](*args, **kwargs)``."""
    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict


_recorders: List[Tuple[List[Launch], int]] = []  # (launches, arch) of open recordings
_observers: List[List[Launch]] = []  # the launches of open observations


@contextlib.contextmanager
def recording_launches(arch: int = 90) -> Iterator[List[Launch]]:
    """``without_launches``, where each launch the wrappers would make is
    appended to the yielded list instead, with the constexprs a CUDA GPU of
    compute capability ``arch`` (e.g. 90) would get: what an ahead-of-time
    compile needs to see a launch's own specialization (``kernels.inspect``).
    Needs triton (not its interpreter, whose kernels do not compile).

    Args:
        arch: the compute capability as major * 10 + minor.
    """
    launches: List[Launch] = []
    _recorders.append((launches, arch))
    try:
        with without_launches():
            yield launches
    finally:
        _recorders.pop()


@contextlib.contextmanager
def observing_launches() -> Iterator[List[Launch]]:
    """Launch the kernels as usual, and append each launch the wrappers make
    to the yielded list: what a call's kernels cost (``kernels.costs``) where
    it really runs (a GPU; a CPU in Triton's interpreter), training included."""
    launches: List[Launch] = []
    _observers.append(launches)
    try:
        yield launches
    finally:
        _observers.pop()


def kernel_op(name: str, implementation: Callable) -> Callable:
    """``implementation`` as the custom operator ``convneur_mm::<name>``
    (``torch.compile`` keeps it whole, CUDA graphs capture it), which runs
    with its tensors' GPU current (``on_tensors_device``), wherever it is
    called from: eagerly, by autograd or by a compiled graph."""
    @functools.wraps(implementation)  # the schema is read from its signature
    def on_device(*args, **kwargs):
        with on_tensors_device(*args, *kwargs.values()):
            return implementation(*args, **kwargs)
    return torch.library.custom_op(f'convneur_mm::{name}', on_device, mutates_args=())


def on_tensors_device(*args) -> ContextManager:
    """The first tensor's CUDA device made current: Triton launches on the
    current device, which need not hold the tensors (a model on ``cuda:1``
    in a process whose current device is ``cuda:0``). Else a no-op."""
    for arg in args:
        if isinstance(arg, Tensor):
            if arg.device.type == 'cuda':
                return torch.cuda.device(arg.device)
            break
    return contextlib.nullcontext()


def call_kernel_op(op: Callable, implementation: Callable, *args):
    """``op(*args)``: a kernel's custom operator (``kernel_op``). Inside
    ``without_launches`` its ``implementation`` itself, so that a count on
    meta tensors sees what the implementation allocates (an operator on
    meta tensors runs its fake, which allocates the results only). Recording
    a training step on meta tensors, both: the implementation records the
    launches, the operator (its fake) carries autograd to the backward's."""
    if not launches_skipped():
        return op(*args)
    if _recorders and torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad and a.is_meta for a in args):
        implementation(*args)
        return op(*args)
    return implementation(*args)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_width(n: int) -> int:
    """``n`` rows or columns as the kernels tile them: the next power of two,
    at least 16 (``tl.dot``'s least)."""
    return max(16, _next_pow2(n))


def column_blocks(d: int) -> Tuple[int, int]:
    """(BD, BE): the column blocks a kernel holds a row of ``d`` features in
    when it splits the row. Where two power-of-two blocks cover fewer columns
    than one, BD is the largest power of two below ``d`` and BE holds the
    rest (80 as 64 + 16, 96 as 64 + 32, 160 as 128 + 32, where one block pads
    to 128, 128 and 256); else one block of ``block_width(d)`` columns and BE
    0. ``tile_config`` splits by default only at ``SPLIT_TILES``' widths."""
    one = block_width(d)
    first = max(16, 1 << (d.bit_length() - 1))
    if first >= d:
        return one, 0
    second = block_width(d - first)
    return (first, second) if first + second < one else (one, 0)


def check_tiles(block_rows: Optional[int], block_hidden: Optional[int],
                names: Tuple[str, str] = ('block_rows', 'block_hidden')) -> None:
    """Tile sizes given by a caller are powers of two >= 16 (``tl.dot``'s least)."""
    for name, value in zip(names, (block_rows, block_hidden)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f'{name} must be a power of two >= 16, got {value}')


# the kernels whose tiles ``tile_config`` decides, by the name a tuned tile names
KERNEL_NAMES = ('read', 'read_backward_rows', 'read_backward_cols', 'grads_rows', 'grads_cols',
                'grads_backward_rows', 'grads_backward_cols', 'grads_chunk',
                'grads_backward_chunk')
# kernels that replace others only where chosen (``chosen_kernel``): the chunk
# gradients' one program per chunk, for its rows and columns passes, forward and backward
REPLACES = {'grads_chunk': ('grads_rows', 'grads_cols'),
            'grads_backward_chunk': ('grads_backward_rows', 'grads_backward_cols')}
_LAUNCH_OPTIONS = ('BM', 'BH', 'num_warps', 'num_stages', 'programs_per_sm', 'split')
# kernels whose wrappers choose their own tiles (``project.triton.projection_tiles``):
# ``forced_tiles`` forces only their column blocks (``split``)
SPLIT_ONLY = ('project', 'project_backward')
# rows held in two column blocks (``column_blocks``) where one padded block
# takes 16-row tiles: {(BD, BE): {GPU: {kernel: (BM, BH)}}} at 8 warps, the largest
# tiles that compile without spills for 16-bit operands as a training step launches
# them (ptxas, triton 3.7), but three that spill less than their padded tiles: the
# one-program backward 8 B on sm_90 (padded 72) and 24 B on sm_80 (padded 352), and
# sm_80's read columns pass 112 B (padded 356).
# 80 and 96 columns stay one block of 128 (their split spilled at 64-row tiles)
SPLIT_TILES: Dict[Tuple[int, int], Dict[int, Dict[str, Tuple[int, int]]]] = {
    (128, 32): {
        90: {'read': (64, 32), 'grads_rows': (64, 32), 'grads_cols': (64, 16),
             'read_backward_rows': (16, 32), 'read_backward_cols': (16, 16),
             'grads_backward_rows': (16, 16), 'grads_backward_cols': (32, 16),
             'grads_chunk': (16, 16), 'grads_backward_chunk': (16, 16)},
        80: {'read': (64, 32), 'grads_rows': (16, 32), 'grads_cols': (32, 16),
             'read_backward_rows': (16, 32), 'read_backward_cols': (16, 16),
             'grads_backward_rows': (16, 32), 'grads_backward_cols': (32, 16),
             'grads_chunk': (16, 16), 'grads_backward_chunk': (16, 16)},
    },
}
# the most rows a tile of 16-bit operands takes on sm_90 and newer, where more
# computed wrong query gradients or faulted: the read's backward rows pass at
# 64 rows on an H200 (triton 3.6), whatever its warps and stages; 32 and 16 were exact
SM90_ROW_LIMITS = {'read_backward_rows': 32}
_forced: List[Tuple[str, dict]] = []  # (kernel, options) of open ``forced_tiles``


@contextlib.contextmanager
def forced_tiles(kernel: str, **options: int) -> Iterator[None]:
    """Launch ``kernel`` with ``options`` (some of BM, BH, num_warps,
    num_stages, programs_per_sm, split) instead of its default or tuned tiles,
    inside the block: how a tuning run tries a configuration. ``split=0``
    holds a row in one padded block where ``column_blocks`` would take two.
    A caller's ``block_rows`` and ``block_hidden`` still take precedence.
    The kernels of ``SPLIT_ONLY`` take ``split`` alone."""
    if kernel in SPLIT_ONLY:
        if set(options) - {'split'}:
            raise ValueError(f'forced_tiles of {kernel!r} takes only split, got '
                             f'{sorted(options)}')
    else:
        _check_kernel(kernel)
    unknown = set(options) - set(_LAUNCH_OPTIONS)
    if unknown:
        raise ValueError(f'forced_tiles takes {_LAUNCH_OPTIONS}, got {sorted(unknown)}')
    if options.get('split', 1) not in (0, 1) or isinstance(options.get('split'), bool):
        raise ValueError(f'split must be 0 or 1, got {options["split"]!r}')
    check_tiles(options.get('BM'), options.get('BH'), ('BM', 'BH'))
    check_programs_per_sm(options.get('programs_per_sm', 0))
    _forced.append((kernel, options))
    try:
        yield
    finally:
        _forced.pop()


@contextlib.contextmanager
def forced_tiles_of(options: Dict[str, Dict[str, int]]) -> Iterator[None]:
    """``forced_tiles`` of several kernels at once, ``{kernel: options}``
    (empty options: the kernel forced at its own tiles, which runs a kernel
    of ``REPLACES`` in place of those it replaces)."""
    with contextlib.ExitStack() as stack:
        for kernel, kernel_options in options.items():
            stack.enter_context(forced_tiles(kernel, **kernel_options))
        yield


def forced_column_blocks(split: Optional[int]) -> ContextManager[None]:
    """``forced_tiles`` of every kernel that ``REPLACES`` does not name
    (forcing one of those would choose it), the projections' included, with
    ``split``: 0 holds each row in one column block, 1 in two where
    ``column_blocks`` finds two; None leaves the defaults. The projections'
    backward holds at most 128 columns per block: 0 there refuses wider rows."""
    kernels = [k for k in KERNEL_NAMES if k not in REPLACES] + list(SPLIT_ONLY)
    return forced_tiles_of({} if split is None else {k: dict(split=split) for k in kernels})


def forced_split(kernel: str) -> Optional[int]:
    """The ``split`` of the innermost open ``forced_tiles`` of ``kernel``
    that names one, or None."""
    return next((options['split'] for name, options in reversed(_forced)
                 if name == kernel and 'split' in options), None)


def check_programs_per_sm(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'programs_per_sm must be an int >= 0 (0: a program per tile), '
                         f'got {value!r}')


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNEL_NAMES:
        raise ValueError(f'kernel must be one of {KERNEL_NAMES}, got {kernel!r}')


def row_limit(kernel: str, operand_dtype: torch.dtype, arch: Optional[int]) -> Optional[int]:
    """The most rows a tile of ``kernel`` may take on this GPU
    (``SM90_ROW_LIMITS``), or None: tuned entries and tuning candidates stay
    within it; ``forced_tiles`` and a caller's ``block_rows`` do not."""
    if arch is None or arch < 90 or operand_dtype == torch.float32:
        return None
    return SM90_ROW_LIMITS.get(kernel)


def tile_config(kernel: str, d: int, rows: int, block_rows: Optional[int],
                block_hidden: Optional[int], operand_dtype: torch.dtype,
                decomposed: bool = False, arch: Optional[int] = None) -> dict:
    """Tile sizes and launch options of a kernel.

    Each option comes from the first of: the caller's ``block_rows`` and
    ``block_hidden``, ``forced_tiles``, a measured entry of
    ``tuned.TUNED_TILES`` for this GPU (compiled kernels only), the defaults. The defaults are the
    largest tiles whose float32 accumulators compile without register spills
    for sm_80 and sm_90 (ptxas, triton 3.7) at two pipeline stages, as the
    kernels launch (``kernels.inspect``), with shared memory at 96 KiB or
    below. 16-bit operands up to 128 wide take 64-row tiles, ``wgmma``'s least
    on sm_90 (the columns passes only there: before sm_90 they spill at 32
    rows and more); float32 operands (CUDA-core products) and the decomposed
    read (twice the operand tiles) take smaller tiles; ``row_limit`` caps
    the defaults and tuned rows where more rows computed wrong results.
    With 16-bit operands (not a decomposed read), rows of ``SPLIT_TILES``'
    widths (M4's 160) are held in two column blocks (``column_blocks``) at
    that table's tiles, not padded to 256 columns in 16-row tiles; a tuned
    entry's ``split`` or ``forced_tiles(kernel, split=0 or 1)`` decides it
    instead.

    Args:
        kernel: one of ``KERNEL_NAMES``.
        d: the head width (its columns).
        rows: the rows of one chunk.
        block_rows, block_hidden: the caller's tile sizes, or None.
        operand_dtype: the products' operand dtype.
        decomposed: a decomposed read.
        arch: the NVIDIA compute capability compiled for (``target_arch``), or None.

    Returns:
        BM, BD, BE (the second column block, 0 for none), BH, num_warps,
        num_stages, and programs_per_sm (0: a program per tile; else
        persistent programs, ``launch_kernel``).
    """
    _check_kernel(kernel)
    columns = kernel.endswith('_cols')  # a weights' pass, per block of hidden units
    write_backward = kernel.startswith('grads_backward')
    forced = next((options for name, options in reversed(_forced) if name == kernel), {})
    tuned = {} if arch is None else tuned_tiles(kernel, arch, operand_dtype, block_width(d),
                                                decomposed) or {}
    split_tiles = _split_tiles(kernel, d, operand_dtype, decomposed, arch)
    split = forced.get('split', tuned.get('split', int(split_tiles is not None)))
    bd, be = column_blocks(d) if split else (block_width(d), 0)
    held = bd + be  # the columns a row's tiles hold
    check_tiles(block_rows, block_hidden)
    warps = 4 if held <= 128 else 8
    if split_tiles is not None and be:
        bm, bh = split_tiles
    elif write_backward and operand_dtype != torch.float32:
        # its rows pass holds about ten (rows, d) float32 tiles: 16 rows compile
        # without spills at C_m 80-128 for sm_80 and sm_90 (64 spill 670 B)
        bm, bh, warps = 16, 32, (4 if columns and held <= 128 else 8)
    elif operand_dtype == torch.float32 or decomposed:
        bm, bh = 16, 16
    elif held <= 128 and kernel == 'grads_chunk':
        # both passes in one program: 64-row tiles spill (44 B on sm_90, 224 B on sm_80)
        bm, bh, warps = 32, 32, 8
    elif held <= 128 and columns:
        # two accumulators: 4 warps fit 80 KiB of shared memory on sm_90
        bm, bh = (64 if arch is not None and arch >= 90 else 16), 32
    elif held <= 128:
        # 8 warps keep the row passes' 64-row tiles well below 255 registers
        bm, bh, warps = 64, 32, 8
    else:
        bm, bh = 16, 32
    if (kernel == 'read_backward_cols' and not decomposed and operand_dtype != torch.float32
            and arch is not None and arch >= 90):
        # per-chunk weight tiles load as float32: 4 warps spill 36 B at C_m 128 (ptxas, triton 3.7)
        warps = 8
    config = dict(BM=bm, BD=bd, BE=be, BH=bh, num_warps=warps, num_stages=2, programs_per_sm=0)
    config.update({key: value for key, value in tuned.items() if key != 'split'})
    config['BM'] = min(config['BM'], row_limit(kernel, operand_dtype, arch) or config['BM'])
    config.update({key: value for key, value in forced.items() if key != 'split'})
    config['BM'] = min(config['BM'], block_width(rows))  # no block past a chunk's rows
    config.update({key: value for key, value in (('BM', block_rows), ('BH', block_hidden))
                   if value is not None})
    return config


def _split_tiles(kernel: str, d: int, operand_dtype: torch.dtype, decomposed: bool,
                 arch: Optional[int]) -> Optional[Tuple[int, int]]:
    """(BM, BH) of ``SPLIT_TILES`` where ``kernel`` holds a row of ``d``
    features in two blocks by default (16-bit operands, not a decomposed
    read; sm_80's entries where the GPU is not known), else None."""
    if operand_dtype == torch.float32 or decomposed:
        return None
    gpus = SPLIT_TILES.get(column_blocks(d), {})
    return gpus.get(90 if arch is not None and arch >= 90 else 80, {}).get(kernel)


def chosen_kernel(kernel: str, d: int, operand_dtype: torch.dtype,
                  arch: Optional[int]) -> bool:
    """Whether ``kernel`` (one of ``REPLACES``) runs in place of the kernels
    it replaces: inside its ``forced_tiles``, or where ``tuned.TUNED_TILES``
    has an entry for it on this GPU (a tuning run records one only where it
    timed the kernel faster than those it replaces) and no ``forced_tiles``
    of a replaced kernel is open (a tuning run timing that one)."""
    if kernel not in REPLACES:
        raise ValueError(f'kernel must be one of {tuple(REPLACES)}, got {kernel!r}')
    forced = {name for name, _ in _forced}
    if kernel in forced:
        return True
    if forced & set(REPLACES[kernel]) or arch is None:
        return False
    return tuned_tiles(kernel, arch, operand_dtype, block_width(d), False) is not None


def tiles_per_program(programs: int, per_sm: int, processors: int) -> int:
    """How many of a kernel's ``programs`` tiles each program serves: 1, or
    with ``per_sm`` persistent programs per multiprocessor the least divisor
    of ``programs`` that leaves at most ``per_sm * processors`` programs. A
    divisor past twice that share would idle most multiprocessors (few
    divisors: a prime count of tiles), and gives 1."""
    if per_sm <= 0 or programs <= per_sm * processors:
        return 1
    share = -(-programs // (per_sm * processors))
    for iters in range(share, 2 * share + 1):
        if programs % iters == 0:
            return iters
    return 1


# multiprocessors of the GPUs a recording compiles for: an A100's 108, an H100's or H200's 132
_RECORDED_PROCESSORS = {80: 108, 90: 132}


def _processors(device: torch.device) -> int:
    """The multiprocessors persistent programs spread over: the CUDA
    device's, a recording's GPU's, else one (the interpreter, where only the
    arithmetic is checked)."""
    if _recorders:
        return _RECORDED_PROCESSORS.get(_recorders[-1][1], 1)
    if device.type == 'cuda' and not launches_skipped():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def launch_kernel(kernel, programs: int, tiles: dict, device: torch.device, *args,
                  **kwargs) -> None:
    """``kernel[grid](*args, **tiles, **kwargs)`` for a kernel of
    ``programs`` tiles: a program per tile, or with ``tiles['programs_per_sm']``
    persistent programs, each serving ``ITERS`` consecutive tiles
    (``tiles_per_program`` over ``_processors``). ``ITERS`` is a compile-time
    constant: a persistent kernel compiles once per count of tiles per program."""
    options = {key: value for key, value in tiles.items() if key != 'programs_per_sm'}
    iters = tiles_per_program(programs, tiles.get('programs_per_sm', 0), _processors(device))
    if iters > 1:  # else the kernels' default, which compiles without the loop
        options['ITERS'] = iters
    kernel[(programs // iters, )](*args, **options, **kwargs)


def tuned_tiles(kernel: str, arch: int, operand_dtype: torch.dtype, block_d: int,
                decomposed: bool) -> Optional[dict]:
    """The launch options ``tuned.TUNED_TILES`` records for a kernel on a
    GPU of compute capability ``arch``, or None where none was measured."""
    from .tuned import TUNED_TILES, dtype_name
    for entry in TUNED_TILES:
        if (entry.kernel, entry.arch, entry.operand_dtype, entry.block_d,
                entry.decomposed) == (kernel, arch, dtype_name(operand_dtype), block_d,
                                      decomposed):
            return entry.options()
    return None


def as_operands(t: Tensor, operand_dtype: torch.dtype) -> Tensor:
    """``t`` (weights) in a 16-bit ``operand_dtype``, cast once here so that
    no program converts its tiles; float32 operands stay ``t``. A broadcast
    (stride-0) dim is cast once, not per broadcast copy.

    Args:
        t: weights or states that products read.
        operand_dtype: the products' operand dtype.
    """
    if operand_dtype == torch.float32 or t.dtype == operand_dtype:
        return t
    distinct = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())
    return t[distinct].to(operand_dtype).expand(t.shape)


def check_arguments(tensors: Sequence[Tuple[str, Tensor, Tuple[str, ...]]],
                    operand_dtype: torch.dtype,
                    tiles: Tuple[Optional[int], Optional[int]],
                    operands: Tuple[str, ...] = (),
                    tile_names: Tuple[str, str] = ('block_rows', 'block_hidden')) -> None:
    """Tile sizes, shapes (named sizes must agree wherever they appear),
    float32 and one device: each failure an error naming the argument.

    Args:
        tensors: (name, tensor, the names of its sizes) of each argument.
        operand_dtype: the products' operand dtype.
        tiles: the caller's (block_rows, block_hidden), or the sizes ``tile_names`` names.
        operands: the arguments that only products read, which may also
            come in ``operand_dtype`` (the scan kernel writes them so).
    """
    check_tiles(*tiles, tile_names)
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
        if t.dtype != torch.float32 and not (name in operands and t.dtype == operand_dtype):
            allowed = f' or {operand_dtype}' if name in operands else ''
            raise TypeError(f'the memory kernels take float32{allowed} tensors; {name} is '
                            f'{t.dtype}')
    first = tensors[0][1]
    for name, t, _ in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f'{name} is on {t.device}, {tensors[0][0]} on {first.device}')
    if operand_dtype not in OPERAND_DTYPES:
        raise ValueError(f'operand_dtype must be one of {OPERAND_DTYPES}, got {operand_dtype}')


def check_decomposed(base: Optional[MemoryWeights], carry: Optional[Tensor], heads_dim: str,
                     carry_shape: Tuple[str, ...]) -> list:
    """``check_arguments``' entries of a decomposed read's ``base`` and ``carry``."""
    if (base is None) != (carry is None):
        raise ValueError('a decomposed read needs both base and carry')
    if base is None:
        return []
    return [('base.w1', base.w1, (heads_dim, 'd', 'h')),
            ('base.w2', base.w2, (heads_dim, 'h', 'd')), ('carry', carry, carry_shape)]


def check_runnable(t: Tensor, operand_dtype: torch.dtype, whole_rows: bool = True) -> None:
    """An error naming why the kernels cannot run for ``t``'s device and, with
    ``whole_rows`` (its last dim a row the kernel holds whole), its width."""
    why = unavailable_reason(t.device, t.shape[-1] if whole_rows else None, operand_dtype)
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


class _Recorder:
    """``kernels.<name>[grid](...)`` that records a ``Launch`` (``recording_launches``),
    and with ``launch`` also launches it (``observing_launches``)."""

    def __init__(self, kernels, launches: List[Launch], launch: bool = False):
        self._kernels, self._launches, self._launch = kernels, launches, launch

    def __getattr__(self, name):
        kernel = getattr(self._kernels, name)
        return _RecordingKernel(kernel, self._launches, self._launch)


class _RecordingKernel:

    def __init__(self, kernel, launches: List[Launch], launch: bool):
        self._kernel, self._launches, self._launch = kernel, launches, launch

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self._launches.append(Launch(self._kernel, tuple(grid), args, kwargs))
            if self._launch:
                self._kernel[grid](*args, **kwargs)
        return record


class _NoLaunch:
    """``kernels.<name>[grid](...)`` that launches nothing (``without_launches``)."""

    def __getattr__(self, name):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def cuda_capability(device: torch.device) -> Optional[int]:
    """An NVIDIA GPU's compute capability (major * 10 + minor); None for
    any other device."""
    if device.type != 'cuda' or torch.version.hip is not None:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def target_arch(device: torch.device) -> Optional[int]:
    """The NVIDIA compute capability (major * 10 + minor) the kernels compile
    for: a recording's (``recording_launches``), a CUDA device's; else None."""
    if _recorders:
        return _recorders[-1][1]
    return None if launches_skipped() else cuda_capability(device)


def gelu_tanh(gelu_approximate: str) -> bool:
    """The kernels' GELU_TANH constexpr for ``F.gelu``'s ``approximate``."""
    return check_gelu_approximate(gelu_approximate) == 'tanh'


def launch_config(operand_dtype: torch.dtype, device: torch.device) -> Tuple[object, dict]:
    """The kernels module and the constexprs of an operand dtype.

    float32 operands multiply in IEEE float32 (as the PyTorch path with TF32
    off). The W_0 part of a decomposed read needs float32 accuracy at tensor
    core speed: three TF32 products (``tf32x3``) on NVIDIA GPUs that have
    TF32, IEEE float32 elsewhere (and in the interpreter, which ignores it)."""
    recording = _recorders[-1] if _recorders else None
    if launches_skipped() and recording is None:
        return _NoLaunch(), dict(DTYPE=None, PREC='ieee', BASE_PREC='ieee')
    import triton.language as tl
    kernels, why, interpreted = load_kernels()
    dtype = {torch.float32: tl.float32, torch.float16: tl.float16,
             torch.bfloat16: tl.bfloat16}[operand_dtype]
    if recording is not None:
        if kernels is None or interpreted:
            raise RuntimeError('recording launches needs compiled Triton kernels, not '
                               f'{why or "its interpreter"}')
        kernels = _Recorder(kernels, recording[0])
    elif _observers:
        kernels = _Recorder(kernels, _observers[-1], launch=True)
    arch = None if interpreted else target_arch(device)
    tf32 = arch is not None and arch >= 80
    return kernels, dict(DTYPE=dtype, PREC='ieee', BASE_PREC='tf32x3' if tf32 else 'ieee')


class _ReadOperands(NamedTuple):
    """What the read kernels take of the states and of a decomposed read."""
    w1: Tensor
    w2: Tensor
    g: Tensor
    base_w1: Tensor
    base_w2: Tensor
    carry_strides: Tuple[int, ...]


def _read_operands(weights: MemoryWeights, base: Optional[MemoryWeights],
                   carry: Optional[Tensor], operand_dtype: torch.dtype) -> _ReadOperands:
    """The read kernels' weights, and W_0 and a_t's strides (any pointers
    and strides where the read is not decomposed: DECOMPOSED is a constexpr,
    they are never read)."""
    w1, w2, g = weights
    if w1.shape[2] == 1 or 0 in w1.stride():
        # W_0 (one state, or broadcast over images) is cast once; per-chunk states are
        # not copied (a 16-bit copy would add half their bytes to the peak): the scan
        # kernel writes them in 16 bits in inference, else they load as float32
        w1, w2 = as_operands(w1, operand_dtype), as_operands(w2, operand_dtype)
    if base is None:
        return _ReadOperands(w1, w2, g, w1[:, 0, 0], w2[:, 0, 0], (0, 0, 0))
    return _ReadOperands(w1, w2, g, base.w1, base.w2, carry.stride())


def launch_read(weights: MemoryWeights, x: Tensor, out: Tensor, length: int,
                operand_dtype: torch.dtype, base: Optional[MemoryWeights],
                carry: Optional[Tensor], block_rows: Optional[int],
                block_hidden: Optional[int], gelu_approximate: str = 'none') -> Tensor:
    """Launch the read kernel: x and out (H, B, N, d), weights (H, B, C, ...),
    base (H, ...) or None, carry (H, B, C) or None; token n reads chunk
    n // length; GELU as ``F.gelu(approximate=gelu_approximate)``. Returns ``out``."""
    w1, w2, g, b1, b2, c_strides = _read_operands(weights, base, carry, operand_dtype)
    heads, batch, n, d = x.shape
    chunks, hidden = w1.shape[2], w1.shape[-1]
    if out.numel() == 0:
        return out
    check_span('x', length, x)
    check_span('out', length, out)
    decomposed = base is not None
    tiles = tile_config('read', d, min(length, n), block_rows, block_hidden, operand_dtype,
                        decomposed, arch=target_arch(x.device))
    kernels, cfg = launch_config(operand_dtype, x.device)
    for r0, row_blocks, part in row_parts(min(length, n), tiles):
        launch_kernel(
            kernels.read_kernel, heads * batch * chunks * row_blocks, part, x.device,
            x, w1, w2, g, out, b1, b2, carry if decomposed else x,
            batch, chunks, n, length, d, hidden, row_blocks, r0,
            *x.stride(), *w1.stride(), *w2.stride(), *g.stride(), *out.stride(),
            *b1.stride(), *b2.stride(), *c_strides,
            LN_EPS, DECOMPOSED=decomposed, **cfg, GELU_TANH=gelu_tanh(gelu_approximate))
    return out


def row_parts(length: int, tiles: dict) -> List[Tuple[int, int, dict]]:
    """A chunk's ``length`` rows as launches of a kernel that runs a program
    per block of rows: (first row, blocks, tiles) each. Past the whole blocks
    of ``tiles['BM']`` rows the rest takes blocks of ``TAIL_ROWS`` (4 warps) in a
    second launch: 196 rows in 64-row blocks multiply 208 rows, not 256."""
    bm = tiles['BM']
    whole = length // bm
    if bm <= TAIL_ROWS or length % bm == 0:
        return [(0, cdiv(length, bm), tiles)]
    tail = (whole * bm, cdiv(length - whole * bm, TAIL_ROWS),
            dict(tiles, BM=TAIL_ROWS, num_warps=4))
    return ([(0, whole, tiles)] if whole else []) + [tail]


# a read's gradients, of (w1, w2, g, inputs, base w1, base w2, carry): a
# custom operator returns a fixed number of tensors (empty where unused)
ReadGrads = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def launch_read_backward(weights: MemoryWeights, x: Tensor, grad_out: Tensor, grad_x: Tensor,
                         length: int, operand_dtype: torch.dtype, base: Optional[MemoryWeights],
                         carry: Optional[Tensor], block_rows: Optional[int],
                         block_hidden: Optional[int], gelu_approximate: str = 'none'
                         ) -> MemoryWeights:
    """Launch the read's two backward kernels, layouts as ``launch_read``'s
    (``grad_out`` as ``out``; ``grad_x`` as ``x``, written). The (tokens, 4d)
    intermediates are recomputed, not saved, as FlashAttention's backward does.

    Returns:
        The weights' gradients per state, float32 (H, B, C, d, 4d),
        (H, B, C, 4d, d), (H, B, C, d) (with ``base``: those of dW_t, equal to
        those of the whole state).
    """
    w1, w2, g, b1, b2, c_strides = _read_operands(weights, base, carry, operand_dtype)
    heads, batch, n, d = x.shape
    chunks, hidden = w1.shape[2], w1.shape[-1]
    opts = dict(device=x.device, dtype=torch.float32)
    grads = MemoryWeights(torch.empty(heads, batch, chunks, d, hidden, **opts),
                          torch.empty(heads, batch, chunks, hidden, d, **opts),
                          torch.empty(heads, batch, chunks, d, **opts))
    if grad_x.numel() == 0 or hidden == 0:
        return grads.map(torch.Tensor.zero_)
    for name, t in (('x', x), ('grad_out', grad_out), ('grad_x', grad_x)):
        check_span(name, length, t)
    check_span('the gradient at the MLP output', length, x.new_empty(0, d))
    decomposed = base is not None
    arch = target_arch(x.device)
    tiles = tile_config('read_backward_rows', d, min(length, n), block_rows, block_hidden,
                        operand_dtype, decomposed, arch=arch)
    kernels, cfg = launch_config(operand_dtype, x.device)
    parts = row_parts(min(length, n), tiles)
    states = heads * batch * chunks
    d_out = torch.empty(heads, batch, chunks, length, d, device=x.device, dtype=operand_dtype)
    # each block's share of g's gradient, summed in a fixed order below
    row_blocks = sum(blocks for _, blocks, _ in parts)
    d_g = torch.empty(states, row_blocks, d, **opts)
    slot0 = 0
    for r0, blocks, part in parts:
        launch_kernel(
            kernels.read_backward_rows_kernel, states * blocks, part, x.device,
            x, grad_out, w1, w2, g, grad_x, d_out, d_g, b1, b2, carry if decomposed else x,
            batch, chunks, n, length, d, hidden, blocks, r0, slot0, row_blocks,
            *x.stride(), *w1.stride(), *w2.stride(), *g.stride(), *grad_out.stride(),
            *grad_x.stride(), *b1.stride(), *b2.stride(), *c_strides,
            LN_EPS, DECOMPOSED=decomposed, **cfg, GELU_TANH=gelu_tanh(gelu_approximate))
        slot0 += blocks
    cols = tile_config('read_backward_cols', d, min(length, n), block_rows, block_hidden,
                       operand_dtype, decomposed, arch=arch)
    hidden_blocks = cdiv(hidden, cols['BH'])
    launch_kernel(
        kernels.read_backward_cols_kernel, states * hidden_blocks, cols, x.device,
        x, d_out, w1, w2, grads.w1, grads.w2, b1, b2, carry if decomposed else x,
        batch, chunks, n, length, d, hidden, hidden_blocks,
        *x.stride(), *w1.stride(), *w2.stride(), *b1.stride(), *b2.stride(), *c_strides,
        DECOMPOSED=decomposed, **cfg, TAIL=TAIL_ROWS, GELU_TANH=gelu_tanh(gelu_approximate))
    torch.sum(d_g.view(heads, batch, chunks, row_blocks, d), dim=3, out=grads.g)
    return grads


def base_read_grads(grads: MemoryWeights, base: Optional[MemoryWeights],
                    carry: Optional[Tensor], like: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """A read operator's gradients of W_0 and a_t: ``decomposed_read_grads``,
    or three empty tensors like ``like`` where the read is not decomposed
    (three: an operator's outputs may not alias)."""
    if base is None:
        return tuple(like.new_empty(0) for _ in range(3))
    return decomposed_read_grads(grads, base, carry)


def empty_read_grads(w1: Tensor, w2: Tensor, g: Tensor, grad_inputs: Tensor,
                     base_w1: Optional[Tensor], base_w2: Optional[Tensor],
                     carry: Optional[Tensor]) -> ReadGrads:
    """A read backward operator's results, empty, in their shapes (its fake),
    ``grad_inputs`` the inputs' gradient as the operator lays it out."""
    new = grad_inputs.new_empty
    like = lambda t: new(0) if t is None else new(t.shape)  # noqa: E731
    return (new(w1.shape), new(w2.shape), new(g.shape), grad_inputs, like(base_w1),
            like(base_w2), like(carry))


def decomposed_read_grads(grads: MemoryWeights, base: MemoryWeights, carry: Tensor
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """A decomposed read's gradients of W_0 and a_t from those of its states
    W_t = a_t W_0 + dW_t (``launch_read_backward``'s, (H, B, C, ...)):
    W_0's is sum a_t dW-gradient over each head's states, a_t's the inner
    product of the state's gradient with W_0.

    Returns:
        base w1 (H, d, 4d), base w2 (H, 4d, d), carry (H, B, C) gradients.
    """
    heads = base.w1.shape[0]
    per_head = lambda t: t.reshape(heads, -1, *t.shape[3:])  # noqa: E731
    weights = carry.reshape(heads, 1, -1)
    grad_base = [torch.bmm(weights, per_head(grad).flatten(2)).view(base_t.shape)
                 for grad, base_t in ((grads.w1, base.w1), (grads.w2, base.w2))]
    grad_carry = sum(torch.bmm(per_head(grad).flatten(2), base_t.reshape(heads, -1, 1))
                     for grad, base_t in ((grads.w1, base.w1), (grads.w2, base.w2)))
    return grad_base[0], grad_base[1], grad_carry.view(carry.shape)
