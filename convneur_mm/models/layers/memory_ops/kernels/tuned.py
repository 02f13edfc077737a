"""What timing the memory's kernels on GPUs decided, as plain data: their
launch options (``TUNED_TILES``) and where ``implementation='auto'`` takes them
(``MEASURED_PATHS``).

``tiles.tile_config`` takes a ``TUNED_TILES`` entry's options for the kernel,
compute capability, operand dtype, padded head width and read kind it names,
in place of its defaults; a kernel without an entry keeps the defaults, which
were chosen by compiling (no spills), not by timing.
``implementation='auto'`` takes the kernels only where a ``MEASURED_PATHS``
entry shows them faster than the PyTorch path (``dispatch.auto_path``).
Entries come from ``python -m benchmarks.run tune`` run on that GPU, which prints
both kinds in this form, or from the benchmark notes' measurements. This
module imports nothing of the policies that read it.
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch

OPERAND_DTYPE_NAMES = ('float32', 'float16', 'bfloat16')
# the kernels whose wrappers choose their tiles (``project.triton.projection_tiles``):
# rows, warps, stages, the split and the backward's output block, no hidden units or
# persistent programs
PROJECTION_KERNELS = ('project', 'project_backward')


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for ``torch.bfloat16``: how the tables name a dtype."""
    return str(dtype).replace('torch.', '')


class TunedTile(NamedTuple):
    """One kernel's measured launch options on one kind of GPU.

    Args:
        kernel: one of ``tiles.KERNEL_NAMES``, or of ``PROJECTION_KERNELS``
            (``project.triton.projection_tiles`` reads their BM, warps,
            stages and split, and the backward's BO).
        arch: the compute capability, major * 10 + minor (90: H100, H200).
        operand_dtype: 'float32', 'float16' or 'bfloat16'.
        block_d: the head width padded to a power of two (``tiles.block_width``);
            the projections': the memory's whole width.
        decomposed: a decomposed read's (only the read kernels have one).
        BM, BH: rows and hidden units per tile (powers of two >= 16); the
            projections have no hidden units (BH 16 stands for none).
        num_warps, num_stages: Triton's launch options.
        programs_per_sm: persistent programs per multiprocessor (0: a
            program per tile).
        split: 1 or 0 to hold a row in two column blocks or one where
            ``tiles.column_blocks`` finds two; None: the defaults decide,
            and the entry's tiles apply to the layout they choose (the
            tuning tool records ``split`` wherever it timed both).
        BO: the projections' backward's output features per product (0:
            whole rows; None: the defaults decide).
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
    BO: Optional[int] = None

    def options(self) -> Dict[str, int]:
        """The launch options the entry sets (``tiles.forced_tiles``' keywords)."""
        options = dict(BM=self.BM, num_warps=self.num_warps, num_stages=self.num_stages)
        if self.kernel not in PROJECTION_KERNELS:
            options.update(BH=self.BH, programs_per_sm=self.programs_per_sm)
        if self.BO is not None:
            options.update(BO=self.BO)
        return options if self.split is None else dict(options, split=self.split)

    def key(self) -> Tuple[str, int, str, int, bool]:
        """What the entry is for: one table entry per key."""
        return self.kernel, self.arch, self.operand_dtype, self.block_d, self.decomposed


# none measured yet: no GPU has run the tuning since the kernels last changed
TUNED_TILES: Tuple[TunedTile, ...] = ()


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
            kernels (``implementation='triton'`` whole), so 'auto' takes
            them too; else only the write and read kernels were timed.
        block_d: the head width measured, padded to a power of two
            (M1-M3's 80, 96 and 128 are 128; M4's 160 is 256, which the
            kernels hold as 128 + 32 columns): an entry speaks for that
            width class only.
        compiled: both paths timed inside ``torch.compile``'s graph (the
            kernels as custom operators, the PyTorch path fused by
            Inductor): 'auto' under torch.compile reads only such entries,
            eager calls only the others.
    """
    arch: int
    operand_dtype: str
    training: bool
    triton_ms: float
    torch_ms: float
    measured: str
    every_kernel: bool = False
    block_d: int = 128
    compiled: bool = False

    def key(self) -> Tuple[int, str, bool, int, bool]:
        """What the entry is for: one table entry per key."""
        return self.arch, self.operand_dtype, self.training, self.block_d, self.compiled


# the four global branches of M3 at batch 128, 224², eager, implementation='triton' against
# 'torch' (docs/notes/benchmarks.md#the-memorys-kernels-on-a-gpu-machine-f, and the
# training step: #the-kernels-profiled-and-trained-with-machine-f)
MEASURED_PATHS: Tuple[MeasuredPath, ...] = (
    MeasuredPath(90, 'bfloat16', False, 10.28, 20.43,
                 'an H200, M3\'s four global branches in inference at batch 128',
                 every_kernel=True, block_d=128),
    MeasuredPath(90, 'float32', False, 54.48, 28.87,
                 'an H200, M3\'s four global branches in inference at batch 128',
                 every_kernel=True, block_d=128),
    # a training step under bf16 autocast: slower through the kernels than the PyTorch path
    # with its default closed-form backward (69.00 ms with autograd's), in half its peak memory
    MeasuredPath(90, 'bfloat16', True, 77.73, 60.27,
                 'an H200, a training step of M3\'s four global branches at batch 128',
                 every_kernel=True, block_d=128),
)
