"""The momentum/decay recursion step by step: the reference of the scan."""
from typing import List, Optional, Sequence

import torch
from torch import Tensor


def scan_states_naive(grads: Sequence[Tensor], lr_mod: Tensor, log_keep: Tensor,
                      log_momentum: Tensor, initial: Sequence[Optional[Tensor]]
                      ) -> List[Tensor]:
    """``scan_states``' result by the recursion ``S_t = eta_t S_{t-1} - rho_t
    G_t`` (S_0 = 0), ``W_t = (1 - alpha_t) W_{t-1} + S_t``, one step at a time.

    Args:
        grads: K gradients (N, U, P_k) (not consumed).
        lr_mod: (K, N, U) rho_t of each tensor.
        log_keep, log_momentum: (N, U) log(1 - alpha_t), log(eta_t).
        initial: K W_0 (N, P_k), or None for zero.

    Returns:
        K states (N, U + 1, P_k).
    """
    out = []
    for g, rho, w0 in zip(grads, lr_mod, initial):
        weights = torch.zeros_like(g[:, 0]) if w0 is None else w0
        momentum, states = torch.zeros_like(weights), [weights]
        for t in range(g.shape[1]):
            momentum = log_momentum[:, t, None].exp() * momentum - rho[:, t, None] * g[:, t]
            weights = log_keep[:, t, None].exp() * weights + momentum
            states.append(weights)
        out.append(torch.stack(states, dim=1))
    return out
