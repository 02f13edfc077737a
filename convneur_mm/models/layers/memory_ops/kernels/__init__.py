"""What the memory's Triton kernels share: availability, tiles and launches.

Importing this package does not import triton. Each op's kernels live beside
its launchers (``memory_ops.<op>.kernels`` and ``memory_ops.<op>.triton`` for
read, chunk_grads, project and scan; the chunk read launches the read's) and
load on first use (``availability.load_kernels``; ``TRITON_INTERPRET=1`` must
be set before then to run them on a CPU in Triton's interpreter).
``kernels_available``/``unavailable_reason`` say whether they can run for a
device, head width and operand dtype, and ``cuda_fault`` which kernels are
known to fault on CUDA GPUs; ``without_launches`` runs their wrappers without
launching them. ``tiles`` holds the tile policy (reading ``tuned``'s measured
tables), ``launcher`` the launches (``launcher.recording_launches`` records
them for an ahead-of-time compile), ``ops`` the custom operators and argument
checks. The operations' Triton implementations are ``read_triton``,
``chunk_read_triton``, ``chunk_grads_triton``, ``project_triton`` and
``scan_states_triton`` (``memory_ops``).
"""
from .availability import (CUDA_FAULTS, MAX_HEAD_DIM, OPERAND_DTYPES, cuda_fault,
                           kernels_available, unavailable_reason, without_launches)

__all__ = ['CUDA_FAULTS', 'MAX_HEAD_DIM', 'OPERAND_DTYPES', 'cuda_fault', 'kernels_available',
           'unavailable_reason', 'without_launches']
