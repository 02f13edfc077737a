"""Every chunk's write gradient by autograd, chunk by chunk: the reference."""
import torch
from torch import Tensor

from ..common import MemoryWeights
from ..read.naive import read_naive


def chunk_grads_naive(weights: MemoryWeights, keys: Tensor, values: Tensor,
                      token_lr: Tensor, *, gelu_approximate: str = 'none') -> MemoryWeights:
    """``chunk_grads_torch``'s result by ``torch.autograd.grad`` of each
    chunk's loss ``sum_i theta_i / d * ||f_W(k_i) - v_i||^2`` (``read_naive``).

    Args:
        weights: ``w1`` (G, d, 4d), ``w2`` (G, 4d, d), ``g`` (G, d).
        keys, values: (G, C, L, d).
        token_lr: (G, C, L).
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.

    Returns:
        (G, C, d, 4d), (G, C, 4d, d), (G, C, d).
    """
    per_chunk = []
    for c in range(keys.shape[1]):
        with torch.enable_grad():
            leaf = weights.map(lambda t: t.detach().requires_grad_())
            pred = read_naive(leaf, keys[:, c], gelu_approximate=gelu_approximate)
            loss = (token_lr[:, c] * (pred - values[:, c]).pow(2).mean(-1)).sum()
            per_chunk.append(torch.autograd.grad(loss, list(leaf)))
    return MemoryWeights(*(torch.stack(grads, dim=1) for grads in zip(*per_chunk)))
