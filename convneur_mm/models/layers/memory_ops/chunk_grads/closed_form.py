"""``chunk_grads_torch`` as a ``torch.autograd.Function`` with a hand-derived
backward: the form the PyTorch path trains with (``backward='closed_form'``).

The outer training then runs no double backward through the inner gradient
and keeps no autograd graph of its chain: the Function saves its inputs and
H (a (T, d) tensor, as wide as the keys) and recomputes the (T, 4d)
intermediates in its backward, as FlashAttention does. First order only:
differentiating it with ``create_graph=True`` raises.

Notation, per group of T = C * L token rows (the weights are shared by the
group's chunks)::

    P = K w1, A = gelu(P), H = A w2, N = LN(H), s = 1 + g, c = theta * 2 / d
    R = K + N s - V, D = R c, Dh = LNback(D s), B = Dh w2^T, Dp = gelu'(P) B
    outputs per chunk: K^T Dp (d, 4d), A^T Dh (4d, d), sum_L D N (d)

where ``LNback(y) = rstd (y - mean(y) - N mean(y N))`` is LayerNorm's input
gradient (``common.ln_backward``), a linear map of ``y`` that is its own
adjoint; the chain up to Dh is ``pytorch.output_rows``.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import (MemoryWeights, check_float, check_gelu_approximate, first_order_only,
                      gelu_grad_operand, gelu_second, ln_backward, no_autocast, operand,
                      product)
from .pytorch import chunk_grads_chain, output_rows


def chunk_grads_closed_form(weights: MemoryWeights, keys: Tensor, values: Tensor,
                            token_lr: Tensor, operand_dtype: Optional[torch.dtype] = None, *,
                            gelu_approximate: str = 'none') -> MemoryWeights:
    """``chunk_grads_torch`` with a closed-form backward (no double backward).

    Gradients flow to ``weights`` (W_0), ``keys``, ``values`` and ``token_lr``.

    Args:
        weights: ``w1`` (G, d, 4d), ``w2`` (G, 4d, d), ``g`` (G, d).
        keys, values: (G, C, L, d): C chunks of L tokens per group; or
            (G, B, U, L, d), the C = B * U chunks as U per image.
        token_lr: (G, C, L) or (G, B, U, L) per-token step sizes theta_i.
        operand_dtype: the products' operand dtype (``product``), forward and
            backward alike; everything else stays in the inputs' dtype.
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.

    Returns:
        The per-chunk gradients (G, C, d, 4d), (G, C, 4d, d), (G, C, d).
    """
    if keys.dim() == 5:  # U chunks per image: the images' chunks one after another
        keys, values, token_lr = keys.flatten(1, 2), values.flatten(1, 2), token_lr.flatten(1, 2)
    _check_inputs(weights, keys, values, token_lr)
    check_gelu_approximate(gelu_approximate)
    return MemoryWeights(*_ChunkGrads.apply(*weights, keys, values, token_lr, operand_dtype,
                                            gelu_approximate))


def _add_product(total: Optional[Tensor], a: Tensor, b: Tensor, mm: Optional[torch.dtype],
                 out_dtype: torch.dtype) -> Tensor:
    """``total + a @ b`` (batched), into ``total`` (None: ``a @ b``), in
    ``out_dtype``; with operands in that dtype as one accumulating GEMM."""
    if total is None:
        return product(a, b, mm, out_dtype)
    if mm is None or mm == out_dtype:
        return total.baddbmm_(a, b)
    return total.add_(product(a, b, mm, out_dtype))


def _by_chunk(a: Tensor, b: Tensor, mm: Optional[torch.dtype], out_dtype: torch.dtype,
              total: Optional[Tensor] = None) -> Tensor:
    """(G, T, m) rows times each chunk's own (G, C, m, n) matrix -> (G, T, n)
    in ``out_dtype``, added to ``total`` where given."""
    g_, chunks, m, n = b.shape
    if total is not None:
        total = total.view(g_ * chunks, -1, n)
    out = _add_product(total, a.reshape(g_ * chunks, -1, m), b.reshape(g_ * chunks, m, n), mm,
                       out_dtype)
    return out.view(g_, -1, n)


def _accumulate(total: Optional[Tensor], term: Tensor) -> Tensor:
    return term if total is None else total.add_(term)


class _ChunkGrads(torch.autograd.Function):
    """Saves its inputs (w1, w2, g, keys, values, token_lr) and H (G, T, d)."""

    @staticmethod
    def forward(ctx, w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
                token_lr: Tensor, mm: Optional[torch.dtype],
                approximate: str) -> Tuple[Tensor, Tensor, Tensor]:
        ctx.mm, ctx.approximate = mm, approximate
        ctx.set_materialize_grads(False)  # an unused output costs no zero tensor
        with no_autocast(keys):
            # H, as wide as the keys, spares the backward a product (as
            # FlashAttention keeps its row statistics); (G, T, 4d) ones are recomputed
            return tuple(chunk_grads_chain(
                MemoryWeights(w1, w2, g), keys, values, token_lr, mm,
                lambda hidden: ctx.save_for_backward(w1, w2, g, keys, values, token_lr, hidden),
                approximate))

    @staticmethod
    def backward(ctx, bar_w1: Optional[Tensor], bar_w2: Optional[Tensor],
                 bar_g: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        first_order_only('chunk_grads_closed_form')
        w1, w2, g, keys, values, token_lr, hidden = ctx.saved_tensors
        if bar_w1 is None and bar_w2 is None and bar_g is None:
            return (None, ) * 8
        with no_autocast(keys):
            grads = _chunk_grads_backward(w1, w2, g, keys, values, token_lr, hidden, ctx.mm,
                                          bar_w1, bar_w2, bar_g, ctx.approximate)
        return tuple(grad if need else None
                     for grad, need in zip(grads, ctx.needs_input_grad)) + (None, None)


def _chunk_grads_backward(w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
                          token_lr: Tensor, hidden: Tensor, mm: Optional[torch.dtype],
                          bar_w1: Optional[Tensor], bar_w2: Optional[Tensor],
                          bar_g: Optional[Tensor], approximate: str = 'none') -> List[Tensor]:
    """The VJP of the chunk gradients: cotangents of (w1, w2, g, keys, values,
    token_lr) from those of the three outputs (None: unused), given H.
    ``bar_x`` is the cotangent of x. With 16-bit operands a tensor that
    only products read is cast once (``operand``), or written in their
    operand dtype by the kernel that computes it."""
    g_, c, L, d = keys.shape
    flat_keys = keys.reshape(g_, c * L, d)
    dtype = keys.dtype  # of every result; the operands may be 16-bit
    keys_op, w1_op, w2_op = (operand(t, mm) for t in (flat_keys, w1, w2))
    pre = product(keys_op, w1_op, mm, dtype)
    act = operand(F.gelu(pre, approximate=approximate), mm)
    rows = output_rows(hidden, flat_keys, values.reshape(g_, c * L, d), g, token_lr)
    w2_t = w2_op.transpose(-1, -2)
    bar_w1, bar_w2 = operand(bar_w1, mm), operand(bar_w2, mm)
    d_hidden = operand(rows.d_hidden, mm)  # three products read it
    bar_dh = bar_w2_total = grad_keys = second = bar_dp = bar_act = None
    if bar_w1 is not None:  # through K^T Dp with Dp = gelu'(P) B, B = Dh w2^T
        back = product(d_hidden, w2_t, mm, dtype)
        # P's term through gelu'(P): gelu''(P) B bar_Dp, here without bar_Dp
        # and the scale gelu_second leaves to the last product
        second, second_scale = gelu_second(pre, approximate)
        second.mul_(back)
        d_pre = gelu_grad_operand(back, pre, mm, approximate)
        del back
        grad_keys = _by_chunk(d_pre, bar_w1.transpose(-1, -2), mm, dtype)
        del d_pre
        bar_dp = _by_chunk(keys_op, bar_w1, mm, dtype)
        # bar_dp is read again at the end: a new tensor
        bar_back = (torch.ops.aten.gelu_backward(bar_dp, pre, approximate=approximate)
                    if mm is None else gelu_grad_operand(bar_dp, pre, mm, approximate))
        bar_dh = product(bar_back, w2_op, mm, dtype)
        bar_w2_total = product(bar_back.transpose(-1, -2), d_hidden, mm, dtype)
        del bar_back
    if bar_w2 is not None:  # through A^T Dh
        bar_act = _by_chunk(d_hidden, bar_w2.transpose(-1, -2), mm, dtype)
        bar_dh = _by_chunk(act, bar_w2, mm, dtype, total=bar_dh)
    # the (G, T, d) rows: Dh = LNback(D s), D = R c, R = K + N s - V, sum_L D N
    normed, rstd, scale = rows.normed, rows.rstd, rows.scale
    bar_d_out = bar_normed = bar_scale = rstd_term = None
    if bar_dh is not None:
        bar_d_out = ln_backward(bar_dh, hidden, rows.mean, rstd)  # LNback is self-adjoint
        bar_scale = (bar_d_out * rows.d_out).sum(dim=1)
        bar_d_out.mul_(scale)
        # LNback's own dependence on N (through N and mean(y N)) and on rstd
        ln_y = (rows.d_normed * normed).mean(-1, keepdim=True)
        ln_bar = (bar_dh * normed).mean(-1, keepdim=True)
        bar_normed = (bar_dh * (-rstd * ln_y)).addcmul_(rows.d_normed, -rstd * ln_bar)
        rstd_term = rstd * (bar_dh * rows.d_hidden).mean(-1, keepdim=True)
        del bar_dh
    if bar_g is not None:
        per_chunk = bar_g.unsqueeze(-2)  # (G, C, 1, d) against (G, C, L, d) views

        def add_times(total: Optional[Tensor], t: Tensor) -> Tensor:  # total + bar_g t
            if total is None:
                return (per_chunk * t.view(g_, c, L, d)).view(g_, c * L, d)
            total.view(g_, c, L, d).addcmul_(per_chunk, t.view(g_, c, L, d))
            return total

        bar_d_out = add_times(bar_d_out, normed)
        bar_normed = add_times(bar_normed, rows.d_out)
    bar_resid = bar_d_out * rows.coef
    bar_token_lr = (bar_d_out * rows.resid).sum(dim=-1).mul_(2.0 / d).view_as(token_lr)
    del bar_d_out
    bar_normed = bar_normed.addcmul_(bar_resid, scale)
    bar_scale = _accumulate(bar_scale, (bar_resid * normed).sum(dim=1))
    bar_values = bar_resid.neg()
    grad_keys = _accumulate(grad_keys, bar_resid)
    del bar_resid
    # N = LN(H): through N, and through the rstd in LNback
    bar_hidden = ln_backward(bar_normed, hidden, rows.mean, rstd)
    if rstd_term is not None:
        bar_hidden.addcmul_(rstd_term, normed, value=-1.0)
    del bar_normed, rows, hidden, d_hidden
    bar_hidden = operand(bar_hidden, mm)  # two products read it
    # H = A w2, A = gelu(P), P = K w1
    bar_act = _add_product(bar_act, bar_hidden, w2_t, mm, dtype)
    bar_w2_total = _add_product(bar_w2_total, act.transpose(-1, -2), bar_hidden, mm,
                                dtype)
    del act, bar_hidden
    if second is None:
        bar_pre = gelu_grad_operand(bar_act, pre, mm, approximate)
    else:  # the sum written in the operand dtype of the two products that read it
        bar_pre = torch.ops.aten.gelu_backward.grad_input(bar_act, pre, approximate=approximate,
                                                          grad_input=bar_act)
        if mm is None:
            bar_pre.addcmul_(second, bar_dp, value=second_scale)
        else:
            bar_pre = torch.addcmul(bar_pre, second, bar_dp, value=second_scale,
                                    out=torch.empty(bar_pre.shape, dtype=mm,
                                                    device=bar_pre.device))
        del second, bar_dp
    del pre, bar_act
    grad_keys = _add_product(grad_keys, bar_pre, w1_op.transpose(-1, -2), mm, dtype)
    grad_w1 = product(keys_op.transpose(-1, -2), bar_pre, mm, dtype)
    return [grad_w1, bar_w2_total, bar_scale, grad_keys.view_as(keys),
            bar_values.view_as(values), bar_token_lr]


def _check_inputs(weights: MemoryWeights, keys: Tensor, values: Tensor,
                  token_lr: Tensor) -> None:
    if keys.dim() != 4:
        raise ValueError(f'keys must be (G, C, L, d), got shape {tuple(keys.shape)}')
    g_, c, L, d = keys.shape
    expected = dict(w1=(g_, d, 4 * d), w2=(g_, 4 * d, d), g=(g_, d), values=(g_, c, L, d),
                    token_lr=(g_, c, L))
    given = dict(zip(MemoryWeights._fields, weights), values=values, token_lr=token_lr)
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f'{name} must have shape {shape} for keys of shape '
                             f'{tuple(keys.shape)}, got {tuple(given[name].shape)}')
    check_float(keys=keys, **given)
