"""The memory's read ``f_W(x)`` in PyTorch ops (differentiable)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import LN_EPS, MemoryWeights, check_gelu_approximate, product


def read_torch(weights: MemoryWeights, x: Tensor, operand_dtype: Optional[torch.dtype] = None,
               base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None, *,
               gelu_approximate: str = 'none') -> Tensor:
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
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``
            ('none': exact; 'tanh': its tanh form).

    Returns:
        (G, M, d) in ``x``'s dtype.
    """
    check_gelu_approximate(gelu_approximate)
    bases = (None, None) if base is None else (base.w1, base.w2)
    hidden = mix(F.gelu(mix(x, weights.w1, bases[0], carry, operand_dtype),
                        approximate=gelu_approximate), weights.w2, bases[1], carry,
                 operand_dtype)
    return x + F.layer_norm(hidden, hidden.shape[-1:], eps=LN_EPS) * (
        1.0 + weights.g.unsqueeze(-2))


def mix(x: Tensor, weight: Tensor, base: Optional[Tensor] = None,
        carry: Optional[Tensor] = None, operand_dtype: Optional[torch.dtype] = None,
        out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """One of the read's products: ``x @ weight`` per group (``product``), or
    for the decomposed read ``x @ (carry * base + weight)`` as
    ``carry * (x @ base)`` (one product per head over all its groups' tokens,
    in ``x``'s precision) plus ``x @ weight`` (per group, in ``operand_dtype``).

    Args:
        x: (G, M, k).
        weight: (G, k, n) (the decomposed read: dW).
        base: (H, k, n) W_0 per head, the G groups head-major; or None.
        carry: (G,) a_t, with ``base``.
        operand_dtype: the products' operand dtype (``product``).
        out_dtype: the result's dtype; None: ``x``'s (``x`` may come in
            ``operand_dtype`` without ``base``).
    """
    out = product(x, weight, operand_dtype, out_dtype or x.dtype)
    if base is None:
        return out
    g_, m, k = x.shape
    h = base.shape[0]
    shared = torch.bmm(x.reshape(h, (g_ // h) * m, k), base).view(g_, m, -1)
    return out.addcmul_(carry.view(g_, 1, 1), shared)
