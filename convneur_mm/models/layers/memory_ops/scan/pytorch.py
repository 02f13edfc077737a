"""The momentum/decay recursion of the memory's states, as matrix products
(PyTorch ops, differentiable)."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


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
        # the carries' rank-one terms as products of inner size 1: their
        # gradients are then two products, not a (N, U + 1, P) mul and sum each
        if weight is not None:
            states.baddbmm_(carry, weight[:, None])
        if momentum is not None:
            states.baddbmm_(from_momentum, momentum[i][:, None])
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
