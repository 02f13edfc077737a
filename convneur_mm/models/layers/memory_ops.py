"""Functional core of the neural memory: its model, closed-form gradients, scans.

The memory model with fast weights ``W = (w1, w2, g)`` is

    f_W(x) = x + LN(gelu(x @ w1) @ w2) * (1 + g)          (LN without affine)

and a chunk writes into it by one step on the loss
``sum_i theta_i / d * ||f_W(k_i) - v_i||^2``. Every function here is written
with plain differentiable tensor ops, batched over any leading dimensions
(batch, heads, chunks), so the outer training differentiates through the inner
update without ``torch.autograd.grad`` in the forward pass.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

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


# torch >= 2.8 on CUDA: a 16-bit product with a float32 output, no rounding of
# the accumulator to 16 bits (the overload has no autograd formula: inference only)
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, 'dtype')


def product(a: Tensor, b: Tensor, operand_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The batched product ``a @ b`` with its operands in ``operand_dtype``,
    accumulated and returned in ``a``'s dtype (float32 or float64).

    Every matrix product of the memory runs through here, so one argument
    decides its precision:

    * ``None`` (or ``a``'s own dtype): the plain product;
    * float32 inputs: 16-bit operands on tensor cores (CUDA) or oneDNN (CPU),
      float32 accumulation; the output is float32 (on CUDA in inference,
      ``bmm(..., out_dtype=float32)``; otherwise the 16-bit output, widened);
    * float64 inputs: the exact products of the operands rounded to
      ``operand_dtype``, accumulated in float64: what a 16-bit GEMM with a
      wide accumulator computes, up to summation order (the CPU tests'
      emulation of the GPU path).

    Args:
        a: (G, M, K).
        b: (G, K, N).
        operand_dtype: the operands' dtype, or None.
    """
    if operand_dtype is None or operand_dtype == a.dtype:
        return torch.bmm(a, b)
    if a.dtype == torch.float64:
        return torch.bmm(a.to(operand_dtype).to(a.dtype), b.to(operand_dtype).to(a.dtype))
    a16, b16 = a.to(operand_dtype), b.to(operand_dtype)
    if (_BMM_OUT_DTYPE and a.is_cuda and a.dtype == torch.float32 and not (
            torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))):
        return torch.ops.aten.bmm.dtype(a16, b16, torch.float32)
    return torch.bmm(a16, b16).to(a.dtype)


def memory_forward(weights: MemoryWeights, x: Tensor,
                   operand_dtype: Optional[torch.dtype] = None,
                   base: Optional[MemoryWeights] = None,
                   carry: Optional[Tensor] = None) -> Tensor:
    """Read the memory: ``f_W(x)``.

    With ``base`` (W_0) and ``carry`` (a_t) the state is decomposed as
    ``W_t = a_t * W_0 + dW_t``: ``weights.w1``/``w2`` then hold dW_t and the
    products become ``a_t * (x @ W_0)`` in ``x``'s precision plus
    ``x @ dW_t`` in ``operand_dtype``. A small update (``max_lr`` 1e-3 makes
    dW about 0.2% of a_t W_0) then survives 16-bit operands, which would
    round it away in a product with the whole state; ``weights.g`` is g_t
    itself (no product).

    Args:
        weights: per-group fast weights, ``w1`` (G, d, 4d), ``w2`` (G, 4d, d),
            ``g`` (G, d) (with ``base``: dW_t for ``w1`` and ``w2``).
        x: (G, M, d) tokens of each group.
        operand_dtype: the products' operand dtype (``product``); None: ``x``'s.
        base: W_0 per head, ``w1`` (H, d, 4d), ``w2`` (H, 4d, d), where the
            G groups are H heads of G / H groups each, head-major.
        carry: (G,) a_t of each group's state.
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


def memory_grads(weights: MemoryWeights, keys: Tensor, values: Tensor,
                 token_lr: Tensor, operand_dtype: Optional[torch.dtype] = None
                 ) -> MemoryWeights:
    """Closed-form gradient of the weighted reconstruction loss of each chunk.

    Args:
        weights: fast weights shared by all chunks of a group: ``w1`` (G, d, 4d),
            ``w2`` (G, 4d, d), ``g`` (G, d).
        keys, values: (G, C, L, d): C chunks of L tokens per group.
        token_lr: (G, C, L) per-token step sizes theta_i weighting the loss.
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


def momentum_decay_states(grads: Tensor, lr_mod: Tensor, log_keep: Tensor,
                          log_momentum: Tensor, initial: Optional[Tensor],
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
        initial: (N, P) W_0, or None for the updates alone: with W_0 = 0
            the states are ``dW_t = W_t - a_t W_0`` (``decay_carry`` gives
            a_t), which a 16-bit read needs apart from ``a_t W_0``.

    Returns:
        (N, U + 1, P): W_0, W_1, ..., W_U (or dW_0 = 0, dW_1, ..., dW_U).
    """
    return scan_states([grads], lr_mod[None], log_keep, log_momentum, [initial],
                       block_size)[0]


def scan_states(grads: List[Optional[Tensor]], lr_mod: Tensor, log_keep: Tensor,
                log_momentum: Tensor, initial: Sequence[Optional[Tensor]],
                block_size: Optional[int] = 64) -> List[Tensor]:
    """``momentum_decay_states`` of K weight tensors that share the gates
    (``log_keep``, ``log_momentum``): their decay matrices are built once.

    Args:
        grads: K gradients (N, U, P_k). The list is consumed: each entry is
            set to None once scanned, so that its memory can go before the
            next tensor's states exist.
        lr_mod: (K, N, U) rho_t of each tensor.
        log_keep, log_momentum: (N, U).
        initial: K W_0 (N, P_k), or None entries (see ``momentum_decay_states``).
        block_size: as in ``momentum_decay_states``.

    Returns:
        K states (N, U + 1, P_k).
    """
    num_steps = log_keep.shape[1]
    if block_size is None or num_steps <= block_size:
        return _block_states(grads, lr_mod, log_keep, log_momentum, list(initial))[0]
    blocks: List[List[Tensor]] = [[] for _ in grads]
    weights, momentum = list(initial), None
    for start in range(0, num_steps, block_size):
        steps = slice(start, min(start + block_size, num_steps))
        states, momentum = _block_states(
            [g[:, steps] for g in grads], lr_mod[..., steps], log_keep[:, steps],
            log_momentum[:, steps], weights, momentum, last=steps.stop == num_steps)
        for block, state in zip(blocks, states):
            block.append(state)
        weights = [state[:, -1] for state in states]
    grads[:] = [None] * len(grads)
    return [torch.cat(block, dim=1) for block in blocks]


def _block_states(grads: List[Optional[Tensor]], lr_mod: Tensor, log_keep: Tensor,
                  log_momentum: Tensor, weights: List[Optional[Tensor]],
                  momentum: Optional[List[Tensor]] = None, last: bool = True
                  ) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
    """One block of ``scan_states`` from the carries (W, S) of each tensor.

    ``momentum=None`` is the first block (S = 0): its states then start with
    a row that is W itself, from the same matrix product. Returns the states
    and, unless ``last``, the momenta S at the block's end. Consumes ``grads``
    as ``scan_states`` does.
    """
    mixes = _decay_matrix(torch.stack([log_keep, log_momentum]))
    keep_mix, momentum_mix = mixes[0], mixes[1]  # [t, r], [r, s]
    mix = keep_mix.bmm(momentum_mix).neg_()  # surprise = -rho_s G_s
    carry = keep_mix[..., 0, None] * log_keep[:, 0, None, None].exp()  # a_t
    if momentum is None:
        mix = F.pad(mix, (0, 0, 1, 0))
        carry = F.pad(carry, (0, 0, 1, 0), value=1.0)
    else:  # S_prev decays through eta, then through keep
        from_momentum = keep_mix.bmm(log_momentum.cumsum(-1).exp()[..., None])
    all_states, end_momenta = [], []
    for i, weight in enumerate(weights):
        g, grads[i] = grads[i], None
        states = (mix * lr_mod[i][:, None]).bmm(g)
        if weight is not None:
            states.addcmul_(carry, weight[:, None])
        if momentum is not None:
            states.addcmul_(from_momentum, momentum[i][:, None])
        all_states.append(states)
        if not last:
            end = (momentum_mix[:, -1, None] * -lr_mod[i][:, None]).bmm(g)[:, 0]
            if momentum is not None:
                end = end + momentum[i] * log_momentum.sum(-1, keepdim=True).exp()
            end_momenta.append(end)
        del g
    return all_states, (None if last else end_momenta)


def decay_carry(log_keep: Tensor) -> Tensor:
    """(N, U) log(1 - alpha_t) -> (N, U + 1) a_t = prod_{s<=t} (1 - alpha_s),
    the factor of W_0 in W_t (a_0 = 1)."""
    return F.pad(log_keep.cumsum(dim=-1), (1, 0)).exp()


def _decay_matrix(log_decay: Tensor) -> Tensor:
    """(..., K) log-coefficients -> (..., K, K) with [t, s] = prod_{s<j<=t} decay_j."""
    cum = log_decay.cumsum(dim=-1)
    future = torch.ones(cum.shape[-1], cum.shape[-1], dtype=torch.bool,
                        device=cum.device).triu(1)
    return torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(future, float('-inf')))
