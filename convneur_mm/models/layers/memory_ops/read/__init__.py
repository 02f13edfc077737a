"""The read ``f_W(x)`` of tokens at one state per group: ``read(weights, x,
operand_dtype, base, carry)``, in PyTorch (``read_torch``), Triton
(``read_triton``) and plainly (``read_naive``, the reference)."""
from typing import Optional

import torch
from torch import Tensor

from ..common import MemoryWeights, implementation_of
from .naive import read_naive
from .pytorch import read_torch
from .triton import read_triton

READ_IMPLEMENTATIONS = {'torch': read_torch, 'triton': read_triton}


def read(weights: MemoryWeights, x: Tensor, operand_dtype: Optional[torch.dtype] = None,
         base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None, *,
         implementation: str = 'torch') -> Tensor:
    """``f_W(x)`` by ``implementation`` ('torch' or 'triton'); the arguments
    as in ``read_torch``."""
    return implementation_of('read', READ_IMPLEMENTATIONS, implementation)(
        weights, x, operand_dtype, base, carry)


__all__ = ['READ_IMPLEMENTATIONS', 'read', 'read_naive', 'read_torch', 'read_triton']
