"""Keep large tensors on glibc's heap in CPU runs.

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MiB under
its dynamic rule) with fresh ``mmap`` pages, and returns the top of the heap
to the kernel beyond ``M_TRIM_THRESHOLD``. A CPU forward/backward allocates
and frees activations of tens of MiB per layer, so each one is page-faulted
in again on every step, which can take as long as the matrix product that
fills it (docs/notes/investigations.md#glibcs-malloc-on-a-cpu). With
both thresholds raised, freed blocks are reused instead; the process keeps its
peak heap (it reaches it anyway). PyTorch's CPU tuning guides reach the same
end by preloading jemalloc or tcmalloc; this needs nothing installed.

Set ``CONVNEUR_MALLOC_TUNING=0`` to keep glibc's defaults. Thresholds given
through glibc's own ``MALLOC_*_THRESHOLD_`` or ``GLIBC_TUNABLES`` variables
are left alone.
"""
import ctypes
import os

import torch

OPT_OUT_ENV = 'CONVNEUR_MALLOC_TUNING'
GLIBC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from <malloc.h>
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # 1 GiB: larger tensors still get their own mapping


def glibc_version() -> str:
    """'2.36' on glibc, '' elsewhere (musl, macOS, Windows)."""
    try:
        name, _, version = os.confstr('CS_GNU_LIBC_VERSION').partition(' ')
    except (AttributeError, ValueError, OSError):
        return ''
    return version if name == 'glibc' else ''


def _user_settings() -> bool:
    """Whether glibc's malloc thresholds were given in the environment."""
    tunables = os.environ.get('GLIBC_TUNABLES', '')
    return (any(name in os.environ for name in GLIBC_ENV) or
            'malloc.mmap_threshold' in tunables or 'malloc.trim_threshold' in tunables)


def tune_cpu_malloc(threshold: int = DEFAULT_THRESHOLD, force: bool = False) -> str:
    """Raise glibc's mmap and trim thresholds for this process and its children.

    Does nothing when the thresholds come from the environment (the user's, or
    a tuned parent's: glibc applied them at start-up), when opted out, off
    glibc, or when CUDA is available (host allocations are not what a GPU run
    waits for) unless ``force``. Returns what was done, for the log.
    """
    if not 0 < threshold < 2**31:
        raise ValueError(f'threshold must be in 1 .. 2**31 - 1 (a C int), got {threshold}')
    if _user_settings():
        return 'glibc malloc thresholds as set in the environment'
    if os.environ.get(OPT_OUT_ENV, '1') == '0':
        return f'glibc malloc defaults kept ({OPT_OUT_ENV}=0)'
    if not glibc_version():
        return 'malloc defaults kept (not glibc)'
    if torch.cuda.is_available() and not force:
        return 'glibc malloc defaults kept (CUDA run)'
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, threshold) and mallopt(M_TRIM_THRESHOLD, threshold)):
        # older glibc versions cap the mmap threshold at 32 MiB
        return f'glibc malloc defaults kept (mallopt refused {threshold})'
    for name in GLIBC_ENV:  # spawned workers and subprocesses read these at start-up
        os.environ[name] = str(threshold)
    return f'glibc malloc: mmap and trim thresholds raised to {threshold >> 20} MiB'
