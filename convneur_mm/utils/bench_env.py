"""One set-up, one description, one synchronization and one GEMM-rate probe of
the device for every benchmark tool."""
import os
import platform
import time

import torch

from .cpu_malloc import tune_cpu_malloc


def setup_benchmark_device(device: str) -> str:
    """Prepare this process for timing on ``device``; describe it for reports.

    CPU runs get the malloc tuning that training and tests use (see
    ``cpu_malloc``), so benchmarks time what users run; every model in a
    report shares it. ``CONVNEUR_MALLOC_TUNING=0`` times glibc's defaults.
    """
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(torch.device(device))
    malloc = tune_cpu_malloc(force=True)
    return (f'{platform.machine()} CPU ({os.cpu_count()} cores), '
            f'{torch.get_num_threads()} torch threads; {malloc}')


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU), for timers."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def peak_gemm_rate(device: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of ``repeats`` float32 ``size``-cubed matrix products.

    The best rate the device's GEMM kernels reach: work that consists of
    matrix products cannot run faster, which makes it the yardstick for the
    speed bounds the benchmarks print.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float('inf')
    for _ in range(repeats + 1):  # the first call warms up
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best
