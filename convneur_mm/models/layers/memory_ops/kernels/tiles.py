"""The memory kernels' tile policy: the rows, column blocks, hidden units,
warps and stages each kernel launches with (``tile_config``).

Each option comes from a caller's tiles, ``forced_tiles`` (how a tuning run
tries one), a measured entry of ``tuned.TUNED_TILES`` (plain data, read
here) or the defaults. ``row_parts`` cuts a chunk's rows into launches.
"""
import contextlib
from typing import ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from . import tuned
from .tuned import OPERAND_DTYPE_NAMES, PROJECTION_KERNELS, TunedTile, dtype_name

# the weights' passes walk a chunk's rows past its whole blocks in steps of
# tl.dot's least rows: 196 rows in 64-row blocks multiply 208 rows, not 256
TAIL_ROWS = 16


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= ``n`` (1 for ``n`` <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def block_width(n: int) -> int:
    """``n`` rows or columns as the kernels tile them: the next power of two,
    at least 16 (``tl.dot``'s least)."""
    return max(16, next_pow2(n))


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
                'grads_backward_chunk', 'read_backward_chunk')
# kernels that replace others only where chosen (``chosen_kernel``): one program
# per chunk for the rows and columns passes of the chunk gradients, forward and
# backward, and of the read's backward
REPLACES = {'grads_chunk': ('grads_rows', 'grads_cols'),
            'grads_backward_chunk': ('grads_backward_rows', 'grads_backward_cols'),
            'read_backward_chunk': ('read_backward_rows', 'read_backward_cols')}
_LAUNCH_OPTIONS = ('BM', 'BH', 'num_warps', 'num_stages', 'programs_per_sm', 'split')
# what ``forced_tiles`` forces of ``PROJECTION_KERNELS`` (their wrappers choose their
# tiles): the forward's options, and the backward's also BO, output features per product
PROJECTION_FORWARD_OPTIONS = ('BM', 'num_warps', 'num_stages', 'split')
PROJECTION_OPTIONS = PROJECTION_FORWARD_OPTIONS + ('BO', )
# every kernel that ``forced_tiles`` and ``tuned.TUNED_TILES`` entries set
TUNED_KERNELS = KERNEL_NAMES + PROJECTION_KERNELS
# rows held in two column blocks (``column_blocks``) where one padded block
# takes 16-row tiles: {(BD, BE): {GPU: {kernel: (BM, BH)}}} at 8 warps, the largest
# tiles that compile without spills for 16-bit operands as a training step launches
# them, or that spill less than their padded tiles; 80 and 96 columns stay one block
# of 128, whose split spilled (docs/notes/benchmarks.md#two-column-blocks-at-m4s-width-machine-i)
SPLIT_TILES: Dict[Tuple[int, int], Dict[int, Dict[str, Tuple[int, int]]]] = {
    # the backward's columns pass at 16 rows: at 32 its loop over a program's chunks
    # spilled 80 B (sm_90) and 188 B (sm_80)
    (128, 32): {
        90: {'read': (64, 32), 'grads_rows': (64, 32), 'grads_cols': (64, 16),
             'read_backward_rows': (16, 32), 'read_backward_cols': (16, 16),
             'grads_backward_rows': (16, 16), 'grads_backward_cols': (16, 16),
             'grads_chunk': (16, 16), 'grads_backward_chunk': (16, 16),
             'read_backward_chunk': (16, 16)},
        # the read at 32 rows: at 64 its 16-bit states spilled 76 B
        80: {'read': (32, 32), 'grads_rows': (16, 32), 'grads_cols': (32, 16),
             'read_backward_rows': (16, 32), 'read_backward_cols': (16, 16),
             'grads_backward_rows': (16, 32), 'grads_backward_cols': (16, 16),
             'grads_chunk': (16, 16), 'grads_backward_chunk': (16, 16),
             'read_backward_chunk': (16, 16)},
    },
}
# the most rows a tile of 16-bit operands takes on sm_90 and newer: the read's backward
# rows pass at 64 rows faulted or computed wrong query gradients on an H200
# (docs/notes/benchmarks.md#the-kernels-profiled-and-trained-with-machine-f); its
# one program per state runs the same rows code
SM90_ROW_LIMITS = {'read_backward_rows': 32, 'read_backward_chunk': 32}
# a decomposed read's (BM, BH) at ``SPLIT_TILES``' widths, on either GPU: its float32
# whole-state tiles in one padded block of 256 spilled 32 B (the read) to 1.25 KB (its
# backward's columns pass, sm_80); split, 0 but 276 B there
# (docs/notes/benchmarks.md#a-decomposed-read-at-m4s-width-in-two-column-blocks-machine-k)
DECOMPOSED_SPLIT_TILES = (16, 16)
_forced: List[Tuple[str, dict]] = []  # (kernel, options) of open ``forced_tiles``


@contextlib.contextmanager
def forced_tiles(kernel: str, **options: int) -> Iterator[None]:
    """Launch ``kernel`` with ``options`` (some of BM, BH, num_warps,
    num_stages, programs_per_sm, split) instead of its default or tuned tiles,
    inside the block: how a tuning run tries a configuration. ``split=0``
    holds a row in one padded block where ``column_blocks`` would take two.
    A caller's ``block_rows`` and ``block_hidden`` still take precedence.
    Nested blocks of one kernel do not merge: the innermost one's options
    are the kernel's (``forced_options``).
    'project' takes ``PROJECTION_FORWARD_OPTIONS``, 'project_backward'
    ``PROJECTION_OPTIONS`` (also BO, its output features per product, 0 for
    whole rows; ``check_output_block``)."""
    allowed = kernel_options(kernel)
    unknown = set(options) - set(allowed)
    if unknown and kernel in PROJECTION_KERNELS:
        raise ValueError(f'forced_tiles of {kernel!r} takes {allowed}, got {sorted(options)}')
    if unknown:
        raise ValueError(f'forced_tiles takes {allowed}, got {sorted(unknown)}')
    if 'BO' in options:
        check_output_block(options['BO'])
    if options.get('split', 1) not in (0, 1) or isinstance(options.get('split'), bool):
        raise ValueError(f'split must be 0 or 1, got {options["split"]!r}')
    check_tiles(options.get('BM'), options.get('BH'), ('BM', 'BH'))
    check_programs_per_sm(options.get('programs_per_sm', 0))
    _forced.append((kernel, options))
    try:
        yield
    finally:
        _forced.pop()


def kernel_options(kernel: str) -> Tuple[str, ...]:
    """The launch options ``forced_tiles`` sets of ``kernel`` (and the
    tuner searches): 'project' takes ``PROJECTION_FORWARD_OPTIONS``,
    'project_backward' ``PROJECTION_OPTIONS``, the others ``_LAUNCH_OPTIONS``."""
    if kernel == 'project_backward':
        return PROJECTION_OPTIONS
    if kernel in PROJECTION_KERNELS:
        return PROJECTION_FORWARD_OPTIONS
    _check_kernel(kernel)
    return _LAUNCH_OPTIONS


def check_output_block(value: int) -> None:
    """The projections' backward's BO: 0 (whole rows) or a power of two >= 16."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'BO must be 0 or a power of two >= 16, got {value!r}')
    if value:
        check_tiles(value, None, ('BO', 'BH'))


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
    kernels = [k for k in KERNEL_NAMES if k not in REPLACES] + list(PROJECTION_KERNELS)
    return forced_tiles_of({} if split is None else {k: dict(split=split) for k in kernels})


def forced_options(kernel: str) -> Dict[str, int]:
    """The options of the innermost open ``forced_tiles`` of ``kernel`` ({}: none)."""
    return next((options for name, options in reversed(_forced) if name == kernel), {})


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
    kernels launch (``benchmarks.kernels.inspect``), with shared memory at 96 KiB or
    below. 16-bit operands up to 128 wide take 64-row tiles, ``wgmma``'s least
    on sm_90 (the columns passes only there: before sm_90 they spill at 32
    rows and more); float32 operands (CUDA-core products) and the decomposed
    read (float32 whole-state tiles) take smaller tiles; ``row_limit`` caps
    the defaults and tuned rows where more rows computed wrong results.
    With 16-bit operands, rows of ``SPLIT_TILES``' widths (M4's 160) are
    held in two column blocks (``column_blocks``) at that table's tiles (a
    decomposed read at ``DECOMPOSED_SPLIT_TILES``), not padded to 256
    columns in 16-row tiles; a tuned entry's ``split`` or
    ``forced_tiles(kernel, split=0 or 1)`` decides it instead.

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
    forced = forced_options(kernel)
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
        # its rows pass holds about ten (rows, d) float32 tiles: 16 rows compile without
        # spills (docs/notes/benchmarks.md#the-backward-kernels-compiled-ahead-of-time-machine-h)
        bm, bh, warps = 16, 32, (4 if columns and held <= 128 else 8)
    elif operand_dtype == torch.float32 or decomposed:
        bm, bh = 16, 16
    elif held <= 128 and kernel == 'read_backward_chunk':
        # both passes in one program: 32 rows spill on sm_80, sm_90 takes row_limit's 32
        # (docs/notes/benchmarks.md#the-reads-backward-as-one-program-per-state-machine-k)
        bm, bh, warps = (32 if arch is not None and arch >= 90 else 16), 32, 8
    elif held <= 128 and kernel == 'grads_chunk':
        # both passes in one program: 64-row tiles spill
        # (docs/notes/benchmarks.md#one-program-per-chunk-machine-h)
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
        # per-chunk weight tiles load as float32: 4 warps spill at C_m 128
        # (docs/notes/benchmarks.md#the-backward-kernels-compiled-ahead-of-time-machine-h)
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
    features in two blocks by default (16-bit operands; sm_80's entries
    where the GPU is not known; a decomposed read ``DECOMPOSED_SPLIT_TILES``),
    else None."""
    if operand_dtype == torch.float32:
        return None
    gpus = SPLIT_TILES.get(column_blocks(d), {})
    if decomposed:
        return DECOMPOSED_SPLIT_TILES if gpus else None
    return gpus.get(90 if arch is not None and arch >= 90 else 80, {}).get(kernel)


def chosen_kernel(kernel: str, d: int, operand_dtype: torch.dtype,
                  arch: Optional[int], decomposed: bool = False, programs: int = 0,
                  processors: int = 0) -> bool:
    """Whether ``kernel`` (one of ``REPLACES``) runs in place of the kernels
    it replaces: inside its ``forced_tiles``, or where ``tuned.TUNED_TILES``
    has an entry for it on this GPU (a tuning run records one only where it
    timed the kernel faster than those it replaces; for a decomposed read,
    ``decomposed``, an entry timed so), its ``programs`` (one per chunk) are
    at least the GPU's ``processors`` (fewer would leave multiprocessors idle
    that the two passes' many more programs fill: a batch of one image, a
    head's single state in a few pseudo-chunks), and no ``forced_tiles`` of
    a replaced kernel is open (a tuning run timing that one)."""
    if kernel not in REPLACES:
        raise ValueError(f'kernel must be one of {tuple(REPLACES)}, got {kernel!r}')
    forced = {name for name, _ in _forced}
    if kernel in forced:
        return True
    if forced & set(REPLACES[kernel]) or arch is None or programs < processors:
        return False
    return tuned_tiles(kernel, arch, operand_dtype, block_width(d), decomposed) is not None


# programs per multiprocessor a kernel keeps at least where it may trade programs for
# work per program (the projections' row groups, the chunk gradients' backward columns
# pass summing several chunks): fewer and the GPU idles
MIN_PROGRAMS_PER_SM = 4


def least_programs(processors: int) -> int:
    """The programs a grid keeps at least on ``processors`` multiprocessors
    (``MIN_PROGRAMS_PER_SM`` each)."""
    return MIN_PROGRAMS_PER_SM * processors


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


def tuned_tiles(kernel: str, arch: int, operand_dtype: torch.dtype, block_d: int,
                decomposed: bool) -> Optional[dict]:
    """The launch options ``tuned.TUNED_TILES`` records for a kernel on a
    GPU of compute capability ``arch``, or None where none was measured."""
    key = (kernel, arch, dtype_name(operand_dtype), block_d, decomposed)
    for entry in tuned.TUNED_TILES:  # read at each call: a patched table counts
        if entry.key() == key:
            return entry.options()
    return None


def check_tuned_tiles(entries: Iterable[TunedTile]) -> None:
    """A clear error for an entry that names no kernel, dtype or valid
    option, and for two entries of the same kernel and GPU."""
    seen = set()
    for entry in entries:
        if entry.kernel not in TUNED_KERNELS:
            raise ValueError(f'{entry}: kernel must be one of {TUNED_KERNELS}')
        if entry.kernel in PROJECTION_KERNELS and (entry.decomposed or entry.programs_per_sm):
            raise ValueError(f'{entry}: the projections have no decomposed or persistent launch')
        if entry.BO is not None and 'BO' not in kernel_options(entry.kernel):
            raise ValueError(f'{entry}: BO is the projections\' backward\'s option only')
        if entry.BO is not None:
            check_output_block(entry.BO)
        if entry.kernel == 'project_backward' and entry.split == 0 and entry.block_d > 128:
            raise ValueError(f'{entry}: the projections\' backward holds rows wider than 128 '
                             'columns in two blocks only')
        if entry.operand_dtype not in OPERAND_DTYPE_NAMES:
            raise ValueError(f'{entry}: operand_dtype must be one of {OPERAND_DTYPE_NAMES}')
        check_tiles(entry.BM, entry.BH, ('BM', 'BH'))
        check_tiles(entry.block_d, None, ('block_d', 'BH'))
        if entry.num_warps not in (1, 2, 4, 8, 16) or entry.num_stages < 1:
            raise ValueError(f'{entry}: num_warps must be a power of two up to 16 and '
                             'num_stages at least 1')
        check_programs_per_sm(entry.programs_per_sm)
        if entry.split not in (None, 0, 1) or isinstance(entry.split, bool):
            raise ValueError(f'{entry}: split must be None, 0 or 1')
        key = entry.key()
        if key in seen:
            raise ValueError(f'two entries for {key}')
        seen.add(key)


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
