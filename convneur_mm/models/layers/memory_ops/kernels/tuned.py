"""What timing the memory's kernels on GPUs decided: their launch options,
and where ``kernels='auto'`` takes them.

``tile_config`` takes a ``TUNED_TILES`` entry's options for the kernel,
compute capability, operand dtype, padded head width and read kind it names,
in place of its defaults; a kernel without an entry keeps the defaults, which
were chosen by compiling (no spills), not by timing. ``kernels='auto'`` takes
the kernels only where a ``MEASURED_PATHS`` entry shows them faster than the
PyTorch path (``auto_path``). Entries come from
``python -m convneur_mm.analysis.kernel_tuning`` run on that GPU, which prints
both kinds in this form, or from the benchmark notes' measurements.
"""
from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import torch

from .launch import KERNEL_NAMES, block_width, check_programs_per_sm, check_tiles

OPERAND_DTYPE_NAMES = ('float32', 'float16', 'bfloat16')


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for ``torch.bfloat16``: how the tables name a dtype."""
    return str(dtype).replace('torch.', '')


class TunedTile(NamedTuple):
    """One kernel's measured launch options on one kind of GPU.

    Args:
        kernel: one of ``launch.KERNEL_NAMES``.
        arch: the compute capability, major * 10 + minor (90: H100, H200).
        operand_dtype: 'float32', 'float16' or 'bfloat16'.
        block_d: the head width padded to a power of two (``block_width``).
        decomposed: a decomposed read's (only the read kernels have one).
        BM, BH: rows and hidden units per tile (powers of two >= 16).
        num_warps, num_stages: Triton's launch options.
        programs_per_sm: persistent programs per multiprocessor (0: a
            program per tile).
        split: 1 or 0 to hold a row in two column blocks or one where
            ``launch.column_blocks`` finds two; None: the defaults decide,
            and the entry's tiles apply to the layout they choose (the
            tuning tool records ``split`` wherever it timed both).
    """
    kernel: str
    arch: int
    operand_dtype: str
    block_d: int
    decomposed: bool
    BM: int
    BH: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 0
    split: Optional[int] = None

    def options(self) -> Dict[str, int]:
        options = dict(BM=self.BM, BH=self.BH, num_warps=self.num_warps,
                       num_stages=self.num_stages, programs_per_sm=self.programs_per_sm)
        return options if self.split is None else dict(options, split=self.split)


# none measured yet: no GPU has run the tuning since the kernels last changed
TUNED_TILES: Tuple[TunedTile, ...] = ()


def check_tuned_tiles(entries: Iterable[TunedTile]) -> None:
    """A clear error for an entry that names no kernel, dtype or valid
    option, and for two entries of the same kernel and GPU."""
    seen = set()
    for entry in entries:
        if entry.kernel not in KERNEL_NAMES:
            raise ValueError(f'{entry}: kernel must be one of {KERNEL_NAMES}')
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
        key = entry[:5]
        if key in seen:
            raise ValueError(f'two entries for {key}')
        seen.add(key)


class MeasuredPath(NamedTuple):
    """The memory timed through the Triton kernels and through the PyTorch
    path, on the same work in one run on one kind of GPU: its write and read
    (the tuning tool's), or whole global branches whose other ops run alike
    on both paths (the benchmark's). The comparison decides, not the ms. An
    entry speaks for its compute capability: an H100 shares sm_90 with an H200.

    Args:
        arch: the compute capability, major * 10 + minor.
        operand_dtype: 'float32', 'float16' or 'bfloat16'.
        training: a training step (forward and backward), else inference.
        triton_ms, torch_ms: the two paths' times.
        measured: what was timed, on which card.
        every_kernel: the Triton time includes the projection and scan
            kernels (``kernels='triton'`` whole), so 'auto' takes them too;
            else only the write and read kernels were timed.
        block_d: the head width measured, padded to a power of two
            (M1-M3's 80, 96 and 128 are 128; M4's 160 is 256, which the
            kernels hold as 128 + 32 columns): an entry speaks for that
            width class only.
    """
    arch: int
    operand_dtype: str
    training: bool
    triton_ms: float
    torch_ms: float
    measured: str
    every_kernel: bool = False
    block_d: int = 128


# docs/notes/benchmarks.md, "The memory's kernels on a GPU": the four global
# branches of M3 at batch 128, 224², eager, kernels='triton' against 'torch'
MEASURED_PATHS: Tuple[MeasuredPath, ...] = (
    MeasuredPath(90, 'bfloat16', False, 10.28, 20.43,
                 'an H200, M3\'s four global branches in inference at batch 128',
                 every_kernel=True, block_d=128),
    MeasuredPath(90, 'float32', False, 54.48, 28.31,
                 'an H200, M3\'s four global branches in inference at batch 128',
                 every_kernel=True, block_d=128),
    # a training step under bf16 autocast: the kernels hold 4287 MiB at peak, PyTorch 11462
    MeasuredPath(90, 'bfloat16', True, 77.73, 69.00,
                 'an H200, a training step of M3\'s four global branches at batch 128',
                 every_kernel=True, block_d=128),
)


def check_measured_paths(entries: Iterable[MeasuredPath]) -> None:
    """A clear error for an entry with an unknown dtype, a time that is not
    positive or a width that is no tile's, and for two entries of the same
    GPU, dtype, mode and width."""
    seen = set()
    for entry in entries:
        if entry.operand_dtype not in OPERAND_DTYPE_NAMES:
            raise ValueError(f'{entry}: operand_dtype must be one of {OPERAND_DTYPE_NAMES}')
        if not (entry.triton_ms > 0 and entry.torch_ms > 0):
            raise ValueError(f'{entry}: the times must be positive')
        check_tiles(entry.block_d, None, ('block_d', 'BH'))
        key = (*entry[:3], entry.block_d)
        if key in seen:
            raise ValueError(f'two measured paths for {key}')
        seen.add(key)


def measured_path(arch: Optional[int], operand_dtype: str, training: bool, head_dim: int
                  ) -> Optional[MeasuredPath]:
    """The ``MEASURED_PATHS`` entry of this GPU, operand dtype, mode and
    tiled head width (``block_width``), or None."""
    key = (arch, operand_dtype, training, block_width(head_dim))
    return next((e for e in MEASURED_PATHS if (*e[:3], e.block_d) == key), None)


def auto_path(arch: Optional[int], operand_dtype: str, training: bool, head_dim: int
              ) -> Tuple[str, str]:
    """('triton' or 'torch', why) for ``kernels='auto'``: the kernels where
    an entry of ``MEASURED_PATHS`` for this GPU, operand dtype, mode and
    tiled head width timed them faster, else the PyTorch path.

    Args:
        arch: the CUDA GPU's compute capability, or None (no CUDA GPU).
        operand_dtype: the products' operand dtype, by name.
        training: a training call.
        head_dim: the memory's head width C_m (its padded width decides).
    """
    mode = 'trains' if training else 'runs'
    if arch is None:
        return 'torch', (f"'auto' {mode} on the PyTorch path off NVIDIA's CUDA GPUs "
                         "(kernels='triton' takes the Triton kernels)")
    entry = measured_path(arch, operand_dtype, training, head_dim)
    what = (f'sm_{arch} with {operand_dtype} operands at heads {head_dim} wide (tiled as '
            f'{block_width(head_dim)})')
    if entry is None:
        return 'torch', (f"'auto' {mode} on the PyTorch path: no GPU has timed the Triton "
                         f"kernels against it on {what} (kernels='triton' takes them)")
    timing = (f'{entry.triton_ms:g} ms through the kernels against {entry.torch_ms:g} ms '
              f'through PyTorch, on {entry.measured}')
    if entry.triton_ms < entry.torch_ms:
        which = 'every Triton kernel' if entry.every_kernel else 'the Triton write and read'
        return 'triton', f"'auto' takes {which} on {what}: {timing}"
    return 'torch', f"'auto' {mode} on the PyTorch path on {what}: {timing}"
