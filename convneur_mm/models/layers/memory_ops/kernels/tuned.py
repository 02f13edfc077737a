"""Launch options of the memory's kernels chosen by timing on a GPU.

``tile_config`` takes an entry's options for the kernel, compute capability,
operand dtype, padded head width and read kind it names, in place of its
defaults. Entries come from ``python -m convneur_mm.analysis.kernel_tuning``
run on that GPU (it prints them in this form); a kernel without an entry keeps
the defaults, which were chosen by compiling (no spills), not by timing.
"""
from typing import Dict, Iterable, NamedTuple, Tuple

from .launch import KERNEL_NAMES, check_tiles

OPERAND_DTYPE_NAMES = ('float32', 'float16', 'bfloat16')


class TunedTile(NamedTuple):
    """One kernel's measured launch options on one kind of GPU.

    Args:
        kernel: one of ``launch.KERNEL_NAMES``.
        arch: the compute capability, major * 10 + minor (90: H100, H200).
        operand_dtype: 'float32', 'float16' or 'bfloat16'.
        block_d: the head width padded to a power of two (``BD``).
        decomposed: a decomposed read's (only the read kernels have one).
        BM, BH: rows and hidden units per tile (powers of two >= 16).
        num_warps, num_stages: Triton's launch options.
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

    def options(self) -> Dict[str, int]:
        return dict(BM=self.BM, BH=self.BH, num_warps=self.num_warps,
                    num_stages=self.num_stages)


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
        key = entry[:5]
        if key in seen:
            raise ValueError(f'two entries for {key}')
        seen.add(key)
