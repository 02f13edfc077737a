"""The read ``f_W(x)`` of tokens at one state per group: ``read(weights, x,
operand_dtype, base, carry)``, in PyTorch (``read_torch``; for training
``read_closed_form``, the same forward with a hand-derived backward), Triton
(``read_triton``, with backward kernels) and plainly (``read_naive``, the reference)."""
from typing import Optional

import torch
from torch import Tensor

from ..common import BACKWARDS, MemoryWeights, implementation_of
from .closed_form import read_closed_form
from .naive import read_naive
from .pytorch import read_torch
from .triton import read_triton

READ_IMPLEMENTATIONS = {'torch': read_torch, 'triton': read_triton}


def read(weights: MemoryWeights, x: Tensor, operand_dtype: Optional[torch.dtype] = None,
         base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None, *,
         implementation: str = 'torch', backward: str = 'autograd',
         gelu_approximate: str = 'none') -> Tensor:
    """``f_W(x)`` by ``implementation`` ('torch' or 'triton'); the arguments
    as in ``read_torch``. ``backward='closed_form'`` (with 'torch') trains
    through ``read_closed_form``."""
    fn = implementation_of('read', READ_IMPLEMENTATIONS, implementation)
    if implementation_of('read backward', BACKWARDS, backward)(implementation):
        fn = read_closed_form
    return fn(weights, x, operand_dtype, base, carry, gelu_approximate=gelu_approximate)


__all__ = ['READ_IMPLEMENTATIONS', 'read', 'read_closed_form', 'read_naive', 'read_torch',
           'read_triton']
