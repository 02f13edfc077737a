"""Fused Triton kernels for the neural memory's parallel mode (inference only).

Importing this package does not import triton; the kernels load on first use
(``TRITON_INTERPRET=1`` must be set before then to run them on a CPU in
Triton's interpreter). ``kernels_available``/``unavailable_reason`` say
whether they can run for a device, head width and operand dtype.
"""
from .ops import (MAX_HEAD_DIM, OPERAND_DTYPES, kernels_available, memory_forward_fused,
                  memory_grads_fused, read_chunks_fused, unavailable_reason)

__all__ = ['MAX_HEAD_DIM', 'OPERAND_DTYPES', 'kernels_available', 'memory_forward_fused',
           'memory_grads_fused', 'read_chunks_fused', 'unavailable_reason']
