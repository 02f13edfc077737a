"""Functional core of the neural memory: its model, closed-form gradients, scans.

The memory model with fast weights ``W = (w1, w2, g)`` is

    f_W(x) = x + LN(gelu(x @ w1) @ w2) * (1 + g)          (LN without affine)

and a chunk writes into it by one step on the loss
``sum_i theta_i / d * ||f_W(k_i) - v_i||^2``. Every function here is written
with plain differentiable tensor ops, batched over any leading dimensions
(batch, heads, chunks), so the outer training differentiates through the inner
update without ``torch.autograd.grad`` in the forward pass.
"""
from typing import NamedTuple, Optional, Tuple

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


def momentum_decay_states(grads: Tensor, lr_mod: Tensor, log_keep: Tensor,
                          log_momentum: Tensor, initial: Tensor,
                          block_size: Optional[int] = 64) -> Tensor:
    """All memory states of the momentum/decay recursion, as matrix products.

    ``S_t = eta_t S_{t-1} - rho_t G_t`` (S_0 = 0) and
    ``W_t = (1 - alpha_t) W_{t-1} + S_t`` unroll to ``W_t = a_t W_0 +
    sum_s M[t, s] G_s`` with a lower-triangular (U x U) matrix ``M`` built
    from cumulative log-coefficients (every exponent is <= 0, so nothing
    overflows). One batched matrix product per block of ``block_size`` steps
    then yields all states; blocks are chained through (W, S) carries, so the
    cost stays linear in U. ``block_size=None`` solves all U steps as one
    block (quadratic in U, but no Python loop over U: one graph for every U
    under torch.export).

    Args:
        grads: (N, U, P) flattened gradients G_1..G_U.
        lr_mod: (N, U) the per-tensor learning-rate modulation rho_t.
        log_keep: (N, U) log(1 - alpha_t).
        log_momentum: (N, U) log(eta_t).
        initial: (N, P) W_0.

    Returns:
        (N, U + 1, P): W_0, W_1, ..., W_U.
    """
    num_steps = grads.shape[1]
    if block_size is None or num_steps <= block_size:
        return _block_states(grads, lr_mod, log_keep, log_momentum, initial)[0]
    blocks = []
    weights, momentum = initial, None
    for start in range(0, num_steps, block_size):
        steps = slice(start, min(start + block_size, num_steps))
        states, momentum = _block_states(
            grads[:, steps], lr_mod[:, steps], log_keep[:, steps], log_momentum[:, steps],
            weights, momentum, last=steps.stop == num_steps)
        blocks.append(states)
        weights = states[:, -1]
    return torch.cat(blocks, dim=1)


def _block_states(grads: Tensor, lr_mod: Tensor, log_keep: Tensor, log_momentum: Tensor,
                  weights: Tensor, momentum: Optional[Tensor] = None,
                  last: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """One block of ``momentum_decay_states`` from the carries (W, S).

    ``momentum=None`` is the first block (S = 0): its states then start with
    a row that is W itself, from the same matrix product. Returns the states
    and, unless ``last``, the momentum S at the block's end.
    """
    keep_mix = _decay_matrix(log_keep)  # [t, r]
    momentum_mix = _decay_matrix(log_momentum)  # [r, s]
    scale = -lr_mod[:, None]  # surprise = -rho_s G_s
    coef = keep_mix.bmm(momentum_mix) * scale
    carry = keep_mix[..., 0, None] * log_keep[:, 0, None, None].exp()  # a_t
    if momentum is None:
        coef = F.pad(coef, (0, 0, 1, 0))
        carry = F.pad(carry, (0, 0, 1, 0), value=1.0)
    states = coef.bmm(grads).addcmul_(carry, weights[:, None])
    if momentum is not None:  # S_prev decays through eta, then through keep
        from_momentum = keep_mix.bmm(log_momentum.cumsum(-1).exp()[..., None])
        states.addcmul_(from_momentum, momentum[:, None])
    if last:
        return states, None
    end_momentum = (momentum_mix[:, -1, None] * scale).bmm(grads)[:, 0]
    if momentum is not None:
        end_momentum = end_momentum + momentum * log_momentum.sum(-1, keepdim=True).exp()
    return states, end_momentum


def _decay_matrix(log_decay: Tensor) -> Tensor:
    """(N, K) log-coefficients -> (N, K, K) with [t, s] = prod_{s<j<=t} decay_j."""
    cum = log_decay.cumsum(dim=-1)
    causal = torch.ones(cum.shape[-1], cum.shape[-1], dtype=torch.bool,
                        device=cum.device).tril()
    return torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float('-inf')))
