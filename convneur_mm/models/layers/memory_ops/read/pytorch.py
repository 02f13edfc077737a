"""The memory's read ``f_W(x)`` in PyTorch ops (differentiable)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import LN_EPS, MemoryWeights, product


def read_torch(weights: MemoryWeights, x: Tensor, operand_dtype: Optional[torch.dtype] = None,
               base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None) -> Tensor:
    """Read the memory: ``f_W(x)``.

    With ``base`` (W_0) and ``carry`` (a_t) the state is decomposed as
    ``W_t = a_t * W_0 + dW_t`` (the decomposed read): ``weights.w1``/``w2``
    then hold dW_t and the products become ``a_t * (x @ W_0)`` in ``x``'s
    precision plus ``x @ dW_t`` in ``operand_dtype``. A small update
    (``max_lr`` 1e-3 makes dW about 0.2% of a_t W_0) then survives 16-bit
    operands, which would round it away in a product with the whole state;
    ``weights.g`` is g_t itself (no product).

    Args:
        weights: per-group fast weights, ``w1`` (G, d, 4d), ``w2`` (G, 4d, d),
            ``g`` (G, d) (with ``base``: dW_t for ``w1`` and ``w2``).
        x: (G, M, d) tokens of each group.
        operand_dtype: the products' operand dtype (``product``); None: ``x``'s.
        base: W_0 per head, ``w1`` (H, d, 4d), ``w2`` (H, 4d, d), where the
            G groups are H heads of G / H groups each, head-major.
        carry: (G,) a_t of each group's state.

    Returns:
        (G, M, d) in ``x``'s dtype.
    """
    if base is None:
        hidden = product(F.gelu(product(x, weights.w1, operand_dtype)), weights.w2,
                         operand_dtype)
    else:
        pre = _decomposed(x, weights.w1, base.w1, carry, operand_dtype)
        hidden = _decomposed(F.gelu(pre), weights.w2, base.w2, carry, operand_dtype)
    return x + F.layer_norm(hidden, hidden.shape[-1:], eps=LN_EPS) * (
        1.0 + weights.g.unsqueeze(-2))


def _decomposed(x: Tensor, delta: Tensor, base: Tensor, carry: Tensor,
                operand_dtype: Optional[torch.dtype]) -> Tensor:
    """``x @ (carry * base + delta)`` per group, as ``carry * (x @ base)``
    (one product per head over all its groups' tokens, in ``x``'s precision)
    plus ``x @ delta`` (per group, in ``operand_dtype``)."""
    g_, m, k = x.shape
    h = base.shape[0]
    shared = torch.bmm(x.reshape(h, (g_ // h) * m, k), base).view(g_, m, -1)
    return product(x, delta, operand_dtype).addcmul_(carry.view(g_, 1, 1), shared)
