"""One set-up, one description, one synchronization, one peak-memory reading,
one call timer, one region timer and one GEMM-rate
probe of the device for every benchmark tool.

Every function takes the device the benchmark runs on. On CUDA that matters:
``torch.cuda.synchronize()``, ``max_memory_allocated()`` and
``reset_peak_memory_stats()`` without a device act on the *current* device, so
``--device cuda:1`` would wait for and measure cuda:0; and kernels run
asynchronously, so a host clock read right after a call times its launch, not
its work.
"""
import os
import platform
import statistics
import time
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch

from convneur_mm.utils.cpu_malloc import tune_cpu_malloc


def is_cuda(device) -> bool:
    return torch.device(device).type == 'cuda'


def setup_benchmark_device(device: str) -> str:
    """Prepare this process for timing on ``device``; describe it for reports.

    CPU runs get the malloc tuning that training and tests use (see
    ``cpu_malloc``), so benchmarks time what users run; every model in a
    report shares it. ``CONVNEUR_MALLOC_TUNING=0`` times glibc's defaults.

    CUDA runs get TF32 off for convolutions and matrix products alike. torch's
    defaults differ between the two (cuDNN convolutions in TF32, matrix
    products not), which would time a convolutional peer (ResNet-50) on
    tensor cores and ConvNeur's pointwise layers and memory products in true
    float32 under the same "float32" heading. Autocast rows are unaffected.
    The device becomes the current one: CUDA graphs, new streams and
    Triton's ``do_bench`` act on the current device.
    """
    if is_cuda(device):
        cuda = torch.device(device)
        if cuda.index is not None:
            torch.cuda.set_device(cuda)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        return f'{torch.cuda.get_device_name(cuda)}, TF32 off (convolutions and matrix products)'
    malloc = tune_cpu_malloc(force=True)
    return (f'{platform.machine()} CPU ({os.cpu_count()} cores{cpu_isa()}), '
            f'{torch.get_num_threads()} torch threads; {malloc}')


def cpu_isa() -> str:
    """The vector/matrix extensions that decide CPU GEMM and bf16 speed."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f
                          if line.startswith('flags')), [])
    except OSError:
        return ''
    wanted = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')
    have = [flag for flag in wanted if flag in flags]
    return ', ' + ' '.join(have) if have else ''


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU), for timers."""
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window on ``device`` (CUDA; a no-op on CPU)."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_bytes(device) -> int:
    """Bytes allocated at the peak of the window on ``device`` (CUDA only)."""
    return torch.cuda.max_memory_allocated(torch.device(device))


def memory_allocated_bytes(device) -> int:
    """Bytes allocated now on ``device`` (CUDA only)."""
    return torch.cuda.memory_allocated(torch.device(device))


class PeakMemoryGrowth:
    """Peak memory a piece of work adds, in MiB, the same on every device:
    on CUDA the allocator's peak in the window over what was allocated when
    it opened (weights and inputs excluded); on a CPU the peak resident set
    in the window over the resident set when it opened.

    On a CPU the window opens by handing malloc's free memory back to the
    kernel and resetting the kernel's high-water mark (see
    ``_open_cpu_window``): otherwise freed blocks that malloc keeps (all of
    them, once ``cpu_malloc`` has raised its thresholds, in this process or a
    parent) are reused without growing the resident set, and an earlier,
    larger peak hides this one; both read as no growth at all.
    """

    def __init__(self, device) -> None:
        self.device = device
        synchronize(device)
        if is_cuda(device):
            reset_peak_memory(device)
            self.base = memory_allocated_bytes(device)
        else:
            self.base = _open_cpu_window()

    def bytes(self) -> int:
        synchronize(self.device)
        peak = peak_memory_bytes(self.device) if is_cuda(self.device) else _peak_rss_bytes()
        return peak - self.base

    def mib(self) -> float:
        return self.bytes() / 2**20


def _open_cpu_window() -> int:
    """Trim malloc's free memory, reset the peak resident set to the current
    one (Linux: ``/proc/self/clear_refs``), and return it in bytes. Where
    either is not possible the window still opens, on the process's peak so
    far (a high-water mark that reads low after a larger earlier peak)."""
    from convneur_mm.utils.cpu_malloc import glibc_version
    if glibc_version():
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # 5: reset the peak RSS (VmHWM), Linux >= 4.0
    except OSError:
        pass
    return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """The process's peak resident set since start or the last reset."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class RegionTimer:
    """Device time spent between ``start(key)`` and ``stop(key)`` calls.

    On CUDA each region is a pair of CUDA events recorded on the device's
    current stream: they time the kernels, which run after the host has moved
    on; the events are read once, after one synchronize, in ``seconds()``. On
    the CPU the host clock is the device clock. Regions may nest or repeat.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self._open: Dict[object, object] = {}
        self._closed: List[Tuple[object, object]] = []

    def _mark(self):
        if self.device.type == 'cuda':
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def start(self, key) -> None:
        self._open[key] = self._mark()

    def stop(self, key) -> None:
        self._closed.append((self._open.pop(key), self._mark()))

    def seconds(self) -> float:
        """Total seconds of the closed regions."""
        if self.device.type == 'cuda':
            synchronize(self.device)
            return sum(start.elapsed_time(end) for start, end in self._closed) / 1e3
        return sum(end - start for start, end in self._closed)


def time_call(fn: Callable[[], object], device='cpu') -> float:
    """Seconds of one call of ``fn``, its queued work on ``device`` included.

    Args:
        fn: the work to time, called without arguments.
        device: the device ``fn`` queues work on; waited for before the clock
            starts and before it stops (CUDA kernels run after the call returns).

    Returns:
        The host-clock seconds of the call.
    """
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_calls(fn: Callable[[], object], repeats: int, device='cpu',
               warmup: int = 0) -> List[float]:
    """Seconds of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones.

    Args:
        fn: the work to time, called without arguments.
        repeats: how many calls to time (at least 1).
        device: see ``time_call``.
        warmup: calls before the timed ones (compilation, caches, autotuning).

    Returns:
        The seconds of each timed call, in call order.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be at least 1, got {repeats}')
    for _ in range(warmup):
        fn()
    return [time_call(fn, device) for _ in range(repeats)]


def time_in_turns(fns: Dict[Hashable, Callable[[], object]], rounds: int, device='cpu',
                  warmup: int = 0,
                  before_round: Optional[Callable[[], object]] = None
                  ) -> Dict[Hashable, List[float]]:
    """Seconds of each function's calls (``time_call``), the functions taking
    turns (a b a b ...), so that a drift in load or clock reaches all alike.

    Args:
        fns: the work to compare, by name, each called without arguments.
        rounds: how many timed turns (at least 1).
        device: see ``time_call``.
        warmup: untimed turns first (compilation, caches, autotuning).
        before_round: called untimed before each timed turn (a pause).

    Returns:
        Each name's seconds, in call order.
    """
    if rounds < 1:
        raise ValueError(f'rounds must be at least 1, got {rounds}')
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[Hashable, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        if before_round is not None:
            before_round()
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def median(values: List[float]) -> float:
    """The middle value (the upper one of an even count), as the tools report."""
    if not values:
        raise ValueError('median of no values')
    return sorted(values)[len(values) // 2]


def relative_spread(values: List[float]) -> float:
    """The interquartile range over the median (``median``): how far repeated
    timings of one work disagree; over a dozen or more, one stall barely moves
    it (over four, it may span it); 0 for one value."""
    if not values:
        raise ValueError('spread of no values')
    if len(values) == 1:
        return 0.0
    lower, _, upper = statistics.quantiles(values, n=4, method='inclusive')
    return (upper - lower) / median(values)


def peak_gemm_rate(device: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of ``repeats`` float32 ``size``-cubed matrix products.

    The best rate the device's GEMM kernels reach: work that consists of
    matrix products cannot run faster, which makes it the yardstick for the
    speed bounds the benchmarks print.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = min(time_calls(lambda: a @ b, repeats, device, warmup=1))
    return 2 * size ** 3 / best
