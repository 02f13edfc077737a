"""Every chunk's closed-form write gradient in PyTorch ops (differentiable)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import LN_EPS, MemoryWeights, product


def _normalize(h: Tensor) -> Tuple[Tensor, Tensor]:
    centered = h - h.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + LN_EPS)
    return centered * rstd, rstd


def chunk_grads_torch(weights: MemoryWeights, keys: Tensor, values: Tensor, token_lr: Tensor,
                      operand_dtype: Optional[torch.dtype] = None) -> MemoryWeights:
    """Closed-form gradient of the weighted reconstruction loss of each chunk.

    Args:
        weights: fast weights shared by all chunks of a group: ``w1`` (G, d, 4d),
            ``w2`` (G, 4d, d), ``g`` (G, d).
        keys, values: (G, C, L, d): C chunks of L tokens per group; or
            (G, B, U, L, d), the C = B * U chunks as U per image.
        token_lr: (G, C, L) or (G, B, U, L) per-token step sizes theta_i
            weighting the loss.
        operand_dtype: the products' operand dtype (``product``); the LayerNorm
            statistics and backward, the residual and theta stay in the
            inputs' dtype.

    Returns:
        d/dW of ``sum_i theta_i / d * ||f_W(k_i) - v_i||^2`` for every chunk:
        shapes (G, C, d, 4d), (G, C, 4d, d), (G, C, d).

    The token-wise products run as one GEMM per group (weights are shared by
    the group's C*L tokens); only the per-chunk reductions are batched by chunk.
    GELU's derivative comes from ATen's fused ``gelu_backward``, which is
    itself differentiable, so the outer training can differentiate through it.

    Of the four (G, C*L, 4d) tensors (``pre``, ``act``, the product before
    GELU's derivative and ``d_pre``) at most two are alive at once when
    autograd keeps none of them (inference): every local is dropped after its
    last use, ``act``'s gradient product runs before ``d_pre`` exists, and
    ``d_pre`` overwrites the product it is computed from.
    """
    if keys.dim() == 5:  # U chunks per image: the images' chunks one after another
        keys, values, token_lr = keys.flatten(1, 2), values.flatten(1, 2), token_lr.flatten(1, 2)
    g_, c, L, d = keys.shape
    mm = operand_dtype
    flat_keys = keys.reshape(g_, c * L, d)
    pre = product(flat_keys, weights.w1, mm)
    act = F.gelu(pre)
    normed, rstd = _normalize(product(act, weights.w2, mm))
    scale = 1.0 + weights.g.unsqueeze(-2)
    d_out = (flat_keys + normed * scale - values.reshape(g_, c * L, d)) * (
        token_lr.reshape(g_, c * L, 1) * (2.0 / d))
    d_g = (d_out * normed).reshape(g_, c, L, d).sum(dim=-2)
    d_normed = d_out * scale
    del d_out
    d_hidden = rstd * (
        d_normed - d_normed.mean(dim=-1, keepdim=True) -
        normed * (d_normed * normed).mean(dim=-1, keepdim=True))
    del d_normed, normed, rstd

    def per_chunk(a: Tensor, b: Tensor) -> Tensor:  # sum_i a_i^T b_i per chunk
        a = a.reshape(g_ * c, L, -1)
        return product(a.transpose(-1, -2), b.reshape(g_ * c, L, -1), mm).reshape(
            g_, c, a.shape[-1], -1)

    grad_w2 = per_chunk(act, d_hidden)
    del act
    back = product(d_hidden, weights.w2.transpose(-1, -2), mm)
    del d_hidden
    if torch.is_grad_enabled() and (back.requires_grad or pre.requires_grad):
        d_pre = torch.ops.aten.gelu_backward(back, pre)
    else:  # in place: no third (G, C*L, 4d) tensor
        d_pre = torch.ops.aten.gelu_backward.grad_input(back, pre, grad_input=back)
    del pre, back
    return MemoryWeights(per_chunk(keys, d_pre), grad_w2, d_g)
