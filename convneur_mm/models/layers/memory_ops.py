"""Functional core of the neural memory: its model, closed-form gradients, scans.

The memory model with fast weights ``W = (w1, w2, g)`` is

    f_W(x) = x + LN(gelu(x @ w1) @ w2) * (1 + g)          (LN without affine)

and a chunk writes into it by one step on the loss
``sum_i theta_i / d * ||f_W(k_i) - v_i||^2``. Every function here is written
with plain differentiable tensor ops, batched over any leading dimensions
(batch, heads, chunks), so the outer training differentiates through the inner
update without ``torch.autograd.grad`` in the forward pass.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5


class MemoryWeights(NamedTuple):
    """Fast weights: ``w1`` (..., d, 4d), ``w2`` (..., 4d, d), ``g`` (..., d)."""
    w1: Tensor
    w2: Tensor
    g: Tensor

    def map(self, fn) -> 'MemoryWeights':
        return MemoryWeights(*(fn(t) for t in self))


def _normalize(h: Tensor) -> tuple:
    centered = h - h.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + LN_EPS)
    return centered * rstd, rstd


def memory_forward(weights: MemoryWeights, x: Tensor) -> Tensor:
    """Read the memory: ``f_W(x)``.

    Args:
        weights: per-group fast weights, ``w1`` (G, d, 4d), ``w2`` (G, 4d, d),
            ``g`` (G, d).
        x: (G, M, d) tokens of each group.
    """
    hidden = F.gelu(torch.bmm(x, weights.w1)).bmm(weights.w2)
    return x + F.layer_norm(hidden, hidden.shape[-1:], eps=LN_EPS) * (
        1.0 + weights.g.unsqueeze(-2))


def memory_grads(weights: MemoryWeights, keys: Tensor, values: Tensor,
                 token_lr: Tensor) -> MemoryWeights:
    """Closed-form gradient of the weighted reconstruction loss of each chunk.

    Args:
        weights: fast weights shared by all chunks of a group: ``w1`` (G, d, 4d),
            ``w2`` (G, 4d, d), ``g`` (G, d).
        keys, values: (G, C, L, d): C chunks of L tokens per group.
        token_lr: (G, C, L) per-token step sizes theta_i weighting the loss.

    Returns:
        d/dW of ``sum_i theta_i / d * ||f_W(k_i) - v_i||^2`` for every chunk:
        shapes (G, C, d, 4d), (G, C, 4d, d), (G, C, d).

    The token-wise products run as one GEMM per group (weights are shared by
    the group's C*L tokens); only the per-chunk reductions are batched by chunk.
    GELU's derivative comes from ATen's fused ``gelu_backward``, which is
    itself differentiable, so the outer training can differentiate through it.
    """
    g_, c, L, d = keys.shape
    flat_keys = keys.reshape(g_, c * L, d)
    pre = flat_keys.bmm(weights.w1)
    act = F.gelu(pre)
    normed, rstd = _normalize(act.bmm(weights.w2))
    scale = 1.0 + weights.g.unsqueeze(-2)
    residual = flat_keys + normed * scale - values.reshape(g_, c * L, d)
    d_out = residual * (token_lr.reshape(g_, c * L, 1) * (2.0 / d))
    d_normed = d_out * scale
    d_hidden = rstd * (
        d_normed - d_normed.mean(dim=-1, keepdim=True) -
        normed * (d_normed * normed).mean(dim=-1, keepdim=True))
    d_pre = torch.ops.aten.gelu_backward(
        d_hidden.bmm(weights.w2.transpose(-1, -2)), pre)

    def per_chunk(a: Tensor, b: Tensor) -> Tensor:  # sum_i a_i^T b_i per chunk
        a = a.reshape(g_ * c, L, -1)
        return a.transpose(-1, -2).bmm(b.reshape(g_ * c, L, -1)).reshape(
            g_, c, a.shape[-1], -1)

    d_g = (d_out * normed).reshape(g_, c, L, d).sum(dim=-2)
    return MemoryWeights(per_chunk(keys, d_pre), per_chunk(act, d_hidden), d_g)


def linear_scan(log_decay: Tensor,
                inputs: Tensor,
                initial: Optional[Tensor] = None,
                block_size: int = 64) -> Tensor:
    """All states of ``x_t = exp(log_decay_t) * x_{t-1} + inputs_t``.

    Args:
        log_decay: (..., T) log of the per-step decay (<= 0 for stability).
        inputs: (..., T, *S) additive inputs.
        initial: (..., *S) state before the first step; zeros if None.
        block_size: steps solved at once as a masked (T x T) product; blocks are
            chained sequentially, so cost is linear in T.

    Returns:
        (..., T, *S) states x_1 .. x_T.
    """
    lead = log_decay.shape
    num_steps = lead[-1]
    state_shape = inputs.shape[len(lead):]
    flat = inputs.reshape(*lead, -1)
    carry = None if initial is None else initial.reshape(*lead[:-1], -1)
    outputs = []
    for start in range(0, num_steps, block_size):
        stop = min(start + block_size, num_steps)
        cum = log_decay[..., start:stop].cumsum(dim=-1)
        diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)  # (..., t, s) = c_t - c_s
        causal = torch.ones(
            stop - start, stop - start, dtype=torch.bool,
            device=diff.device).tril()
        mix = torch.exp(diff.masked_fill(~causal, float('-inf')))
        block = mix @ flat[..., start:stop, :]
        if carry is not None:
            block = block + cum.exp().unsqueeze(-1) * carry.unsqueeze(-2)
        outputs.append(block)
        carry = block[..., -1, :]
    return torch.cat(outputs, dim=-2).reshape(*lead, *state_shape)
