"""The chunk read: token n of a (head, image) reads state ``n // L``, heads
merged in the output: ``chunk_read(states, queries, chunk_size, operand_dtype,
base, carry)`` in PyTorch (``chunk_read_torch``), Triton
(``chunk_read_triton``) and plainly (``chunk_read_naive``, the reference).
``base`` and ``carry`` select the decomposed read; ``backward='closed_form'``
makes the PyTorch one read through ``read_closed_form`` (its training form)."""
from typing import Optional

import torch
from torch import Tensor

from ..common import BACKWARDS, MemoryWeights, implementation_of
from .naive import chunk_read_naive
from .pytorch import chunk_read_torch
from .triton import chunk_read_triton

CHUNK_READ_IMPLEMENTATIONS = {'torch': chunk_read_torch, 'triton': chunk_read_triton}


def chunk_read(states: MemoryWeights, queries: Tensor, chunk_size: int,
               operand_dtype: Optional[torch.dtype] = None,
               base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None, *,
               implementation: str = 'torch', backward: str = 'autograd',
               gelu_approximate: str = 'none') -> Tensor:
    """The chunk read by ``implementation`` ('torch' or 'triton'); the
    arguments as in ``chunk_read_torch``. Returns (B, N, H * d)."""
    fn = implementation_of('chunk_read', CHUNK_READ_IMPLEMENTATIONS, implementation)
    if implementation_of('chunk_read backward', BACKWARDS, backward)(implementation):
        return chunk_read_torch(states, queries, chunk_size, operand_dtype, base, carry,
                                backward=backward, gelu_approximate=gelu_approximate)
    return fn(states, queries, chunk_size, operand_dtype, base, carry,
              gelu_approximate=gelu_approximate)


__all__ = ['CHUNK_READ_IMPLEMENTATIONS', 'chunk_read', 'chunk_read_naive', 'chunk_read_torch',
           'chunk_read_triton']
