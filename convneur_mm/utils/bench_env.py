"""One set-up and one description of the device for every benchmark tool."""
import os
import platform

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
