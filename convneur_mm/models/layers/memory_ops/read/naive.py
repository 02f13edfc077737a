"""The read ``f_W(x)`` written plainly: the reference of its implementations."""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..common import LN_EPS, MemoryWeights, check_gelu_approximate


def read_naive(weights: MemoryWeights, x: Tensor, base: Optional[MemoryWeights] = None,
               carry: Optional[Tensor] = None, *, gelu_approximate: str = 'none') -> Tensor:
    """``x + LN(gelu(x @ w1) @ w2) * (1 + g)`` with exact products in ``x``'s
    dtype (float64 for a reference); with ``base`` and ``carry`` the weights
    ``carry * base + weights`` are formed first.

    Args:
        weights: ``w1`` (G, d, 4d), ``w2`` (G, 4d, d), ``g`` (G, d).
        x: (G, M, d).
        base: W_0 per head, ``w1`` (H, d, 4d), ``w2`` (H, 4d, d), the G groups
            H heads of G / H groups each, head-major.
        carry: (G,) a_t of each group.
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.
    """
    check_gelu_approximate(gelu_approximate)
    w1, w2 = weights.w1, weights.w2
    if base is not None:
        per_group = x.shape[0] // base.w1.shape[0]
        a = carry.view(-1, 1, 1)
        w1 = a * base.w1.repeat_interleave(per_group, 0) + w1
        w2 = a * base.w2.repeat_interleave(per_group, 0) + w2
    hidden = F.gelu(x @ w1, approximate=gelu_approximate) @ w2
    return x + F.layer_norm(hidden, hidden.shape[-1:], eps=LN_EPS) * (1 + weights.g.unsqueeze(-2))
