"""How a Triton wrapper launches an op's kernels: the op's kernels module
and its constexprs (``launch_config``), the grid of a kernel's tiles
(``launch_kernel``), and the compute capability compiled for
(``target_arch``). Launches can be recorded for an ahead-of-time compile
(``recording_launches``) or observed as they run (``observing_launches``).
"""
import contextlib
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch

from .availability import launches_skipped, load_kernels, without_launches
from .tiles import tiles_per_program


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
    compile needs to see a launch's own specialization (``benchmarks.kernels.inspect``).
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
    to the yielded list: what a call's kernels cost where it really runs (a
    GPU; a CPU in Triton's interpreter), training included
    (``benchmarks.kernels.profile.kernel_costs``)."""
    launches: List[Launch] = []
    _observers.append(launches)
    try:
        yield launches
    finally:
        _observers.pop()


def recording() -> bool:
    """Whether a ``recording_launches`` context is open."""
    return bool(_recorders)


# multiprocessors of the GPUs a recording compiles for: an A100's 108, an H100's or H200's 132
_RECORDED_PROCESSORS = {80: 108, 90: 132}


def multiprocessors(device: torch.device) -> int:
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
    (``tiles_per_program`` over ``multiprocessors``). ``ITERS`` is a compile-time
    constant: a persistent kernel compiles once per count of tiles per program."""
    options = {key: value for key, value in tiles.items() if key != 'programs_per_sm'}
    iters = tiles_per_program(programs, tiles.get('programs_per_sm', 0), multiprocessors(device))
    if iters > 1:  # else the kernels' default, which compiles without the loop
        options['ITERS'] = iters
    kernel[(programs // iters, )](*args, **options, **kwargs)


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


def launch_config(op: str, operand_dtype: torch.dtype, device: torch.device
                  ) -> Tuple[object, dict]:
    """The kernels module of ``op`` (``availability.KERNEL_OPS``) and the
    constexprs of an operand dtype.

    float32 operands multiply in IEEE float32 (as the PyTorch path with TF32
    off). The whole state of a decomposed read needs float32 accuracy at tensor
    core speed: three TF32 products (``tf32x3``) on NVIDIA GPUs that have
    TF32, IEEE float32 elsewhere (and in the interpreter, which ignores it)."""
    recording = _recorders[-1] if _recorders else None
    if launches_skipped() and recording is None:
        return _NoLaunch(), dict(DTYPE=None, PREC='ieee', BASE_PREC='ieee')
    import triton.language as tl
    kernels, why, interpreted = load_kernels(op)
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
