"""Every chunk's closed-form write gradient at shared weights:
``chunk_grads(weights, keys, values, token_lr, operand_dtype)`` in PyTorch
(``chunk_grads_torch``; for training ``chunk_grads_closed_form``, the same
forward with a hand-derived backward), Triton (``chunk_grads_triton``,
with backward kernels; ``chunk_grads_triton_staged`` in inference, its two
passes in two calls) and by autograd (``chunk_grads_naive``, the reference)."""
from typing import Optional

import torch
from torch import Tensor

from ..common import BACKWARDS, MemoryWeights, implementation_of
from .closed_form import chunk_grads_closed_form
from .naive import chunk_grads_naive
from .pytorch import chunk_grads_torch
from .triton import chunk_grads_triton, chunk_grads_triton_staged

CHUNK_GRADS_IMPLEMENTATIONS = {'torch': chunk_grads_torch, 'triton': chunk_grads_triton}


def chunk_grads(weights: MemoryWeights, keys: Tensor, values: Tensor, token_lr: Tensor,
                operand_dtype: Optional[torch.dtype] = None, *,
                implementation: str = 'torch', backward: str = 'autograd',
                gelu_approximate: str = 'none',
                grads_dtype: Optional[torch.dtype] = None) -> MemoryWeights:
    """The chunks' gradients by ``implementation`` ('torch' or 'triton'); the
    arguments as in ``chunk_grads_torch``. ``backward='closed_form'`` (with
    'torch') trains through ``chunk_grads_closed_form``. ``grads_dtype``
    (the Triton kernels only: ``chunk_grads_triton``'s) writes w1's and w2's
    gradients in a 16-bit operand dtype."""
    fn = implementation_of('chunk_grads', CHUNK_GRADS_IMPLEMENTATIONS, implementation)
    if implementation_of('chunk_grads backward', BACKWARDS, backward)(implementation):
        fn = chunk_grads_closed_form
    options = dict(gelu_approximate=gelu_approximate)
    if grads_dtype not in (None, torch.float32):
        if fn is not chunk_grads_triton:
            raise ValueError(f'grads_dtype {grads_dtype} takes the Triton kernels, not '
                             f'implementation={implementation!r}')
        options['grads_dtype'] = grads_dtype
    return fn(weights, keys, values, token_lr, operand_dtype, **options)


__all__ = ['CHUNK_GRADS_IMPLEMENTATIONS', 'chunk_grads', 'chunk_grads_closed_form',
           'chunk_grads_naive', 'chunk_grads_torch', 'chunk_grads_triton',
           'chunk_grads_triton_staged']
