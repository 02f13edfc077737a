"""The Triton kernels of the memory's operations: availability and launches.

Importing this package does not import triton; the kernels (``jit``) load on
first use (``TRITON_INTERPRET=1`` must be set before then to run them on a
CPU in Triton's interpreter). ``kernels_available``/``unavailable_reason`` say
whether they can run for a device, head width and operand dtype, and
``cuda_fault`` which kernels are known to fault on CUDA GPUs;
``without_launches`` runs their wrappers without launching them; ``inspect``
compiles their launches ahead of time for a GPU and reports registers, spills
and matrix instructions (``launch.recording_launches`` records them). The
operations' Triton implementations are ``read_triton``, ``chunk_grads_triton``
and ``chunk_read_triton`` (``memory_ops``).
"""
from .availability import (CUDA_FAULTS, MAX_HEAD_DIM, OPERAND_DTYPES, cuda_fault,
                           kernels_available, unavailable_reason, without_launches)

__all__ = ['CUDA_FAULTS', 'MAX_HEAD_DIM', 'OPERAND_DTYPES', 'cuda_fault', 'kernels_available',
           'unavailable_reason', 'without_launches']
