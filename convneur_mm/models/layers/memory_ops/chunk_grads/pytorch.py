"""Every chunk's closed-form write gradient in PyTorch ops (differentiable),
and the parts of its chain that its closed-form backward (``closed_form``)
computes again."""
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import (LN_EPS, MemoryWeights, autograd_records, check_gelu_approximate,
                      first_order_guard, gelu_grad_operand, ln_backward, operand, product)

# why the write's gradient is not differentiated twice, on any path
WHY_FIRST_ORDER = " (PyTorch's LayerNorm gives wrong third derivatives)"


class OutputRows(NamedTuple):
    """The chain's (G, T, d) tensors after the MLP's output H, and per-row
    statistics (``output_rows``): N = LN(H), its mean and rstd, s = 1 + g,
    c = theta * 2 / d, R = K + N s - V, D = R c, D s and Dh = LNback(D s)."""
    normed: Tensor
    mean: Tensor
    rstd: Tensor
    scale: Tensor
    coef: Tensor
    resid: Tensor
    d_out: Tensor
    d_normed: Tensor
    d_hidden: Tensor


def output_rows(hidden: Tensor, flat_keys: Tensor, flat_values: Tensor, g: Tensor,
                token_lr: Tensor) -> OutputRows:
    """The loss's gradient at the MLP's output and what leads to it, from the
    output H (G, T, d) (differentiable).

    Args:
        hidden: H = gelu(K w1) w2, (G, T, d).
        flat_keys, flat_values: K and V, (G, T, d).
        g: (G, d).
        token_lr: theta, T per group in any shape.
    """
    d = hidden.shape[-1]
    normed, mean, rstd = torch.native_layer_norm(hidden, (d, ), None, None, LN_EPS)
    scale = 1.0 + g.unsqueeze(-2)
    coef = token_lr.reshape(hidden.shape[0], -1, 1) * (2.0 / d)
    resid = torch.addcmul(flat_keys - flat_values, normed, scale)
    d_out = resid * coef
    d_normed = d_out * scale
    # ATen differentiates its LayerNorm backward once exactly, but a second time as if the
    # statistics were constants (pytorch/pytorch#175754): an error, not a wrong answer
    d_hidden = first_order_guard(ln_backward(d_normed, hidden, mean, rstd),
                                 "the memory's write", WHY_FIRST_ORDER)
    return OutputRows(normed, mean, rstd, scale, coef, resid, d_out, d_normed, d_hidden)


def chunk_sums(a: Tensor, b: Tensor, chunks: int, operand_dtype: Optional[torch.dtype],
               out_dtype: torch.dtype) -> Tensor:
    """(G, T, m), (G, T, n) -> (G, C, m, n) in ``out_dtype``: ``sum_i a_i^T
    b_i`` over each of the C chunks' rows."""
    g_, t, m = a.shape
    a = a.reshape(g_ * chunks, t // chunks, m)
    return product(a.transpose(-1, -2), b.reshape(g_ * chunks, t // chunks, -1),
                   operand_dtype, out_dtype).view(g_, chunks, m, -1)


def chunk_grads_torch(weights: MemoryWeights, keys: Tensor, values: Tensor, token_lr: Tensor,
                      operand_dtype: Optional[torch.dtype] = None, *,
                      gelu_approximate: str = 'none') -> MemoryWeights:
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
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``
            ('none': exact; 'tanh': its tanh form).

    Returns:
        d/dW of ``sum_i theta_i / d * ||f_W(k_i) - v_i||^2`` for every chunk:
        shapes (G, C, d, 4d), (G, C, 4d, d), (G, C, d).

    The token-wise products run as one GEMM per group (weights are shared by
    the group's C*L tokens); only the per-chunk reductions are batched by chunk.
    GELU's and LayerNorm's derivatives come from ATen's fused backward
    kernels, themselves differentiable, so the outer training can
    differentiate through them (``closed_form`` spares it that).

    Of the four (G, C*L, 4d) tensors (``pre``, ``act``, the product before
    GELU's derivative and ``d_pre``) at most two are alive at once when
    autograd keeps none of them (inference): every local is dropped after its
    last use, ``act``'s gradient product runs before ``d_pre`` exists, and
    ``d_pre`` overwrites the product it is computed from (with 16-bit
    operands, ``act`` and ``d_pre`` are written 16-bit: half a tensor each).
    """
    check_gelu_approximate(gelu_approximate)
    if keys.dim() == 5:  # U chunks per image: the images' chunks one after another
        keys, values, token_lr = keys.flatten(1, 2), values.flatten(1, 2), token_lr.flatten(1, 2)
    return chunk_grads_chain(weights, keys, values, token_lr, operand_dtype,
                             gelu_approximate=gelu_approximate)


def chunk_grads_chain(weights: MemoryWeights, keys: Tensor, values: Tensor, token_lr: Tensor,
                      operand_dtype: Optional[torch.dtype],
                      on_hidden: Optional[Callable[[Tensor], None]] = None,
                      gelu_approximate: str = 'none') -> MemoryWeights:
    """``chunk_grads_torch`` on (G, C, L, d) keys and values; ``on_hidden``
    gets the MLP's output H (G, C * L, d) as it is computed (the closed
    form's forward saves it), which is otherwise freed as soon as it is read."""
    g_, c, L, d = keys.shape
    mm, dtype = operand_dtype, keys.dtype
    flat_keys = keys.reshape(g_, c * L, d)
    # K, gelu(P), Dh and w2 are read by two products each: in operand_dtype once,
    # but not under autograd, which would sum the two products' gradients in 16 bits
    shared = None if torch.is_grad_enabled() else mm
    keys_op, w2 = operand(flat_keys, shared), operand(weights.w2, shared)
    pre = product(keys_op, weights.w1, mm, dtype)
    act = operand(F.gelu(pre, approximate=gelu_approximate), shared)
    hidden = product(act, w2, mm, dtype)
    if on_hidden is not None:
        on_hidden(hidden)
    rows = output_rows(hidden, flat_keys, values.reshape(g_, c * L, d), weights.g, token_lr)
    del hidden
    d_g = (rows.d_out * rows.normed).view(g_, c, L, d).sum(dim=-2)
    d_hidden = operand(rows.d_hidden, shared)
    del rows
    grad_w2 = chunk_sums(act, d_hidden, c, mm, dtype)
    del act
    back = product(d_hidden, w2.transpose(-1, -2), mm, dtype)
    del d_hidden
    if autograd_records(back, pre):
        d_pre = torch.ops.aten.gelu_backward(back, pre, approximate=gelu_approximate)
    else:  # in place, or in operand_dtype: no third float (G, C*L, 4d) tensor
        d_pre = gelu_grad_operand(back, pre, mm, gelu_approximate)
    del pre, back
    return MemoryWeights(chunk_sums(keys_op, d_pre, c, mm, dtype), grad_w2, d_g)
