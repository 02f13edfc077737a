"""``read_torch`` (the read ``f_W(x)``) as a ``torch.autograd.Function``
with a hand-derived backward: the form the PyTorch path trains with
(``backward='closed_form'``). It saves its inputs (those only products read
in their operand dtype) and H (G, M, d) and recomputes the (M, 4d)
intermediates in its backward; the decomposed read (``base`` and ``carry``)
included. First order only: differentiating it with
``create_graph=True`` raises."""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import (LN_EPS, MemoryWeights, check_float, check_gelu_approximate,
                      first_order_only, gelu_grad_operand, ln_backward, no_autocast, operand,
                      product)
from .pytorch import mix


def read_closed_form(weights: MemoryWeights, x: Tensor,
                     operand_dtype: Optional[torch.dtype] = None,
                     base: Optional[MemoryWeights] = None,
                     carry: Optional[Tensor] = None, *,
                     gelu_approximate: str = 'none') -> Tensor:
    """``read_torch`` with a closed-form backward; the arguments as there.

    Args:
        weights: ``w1`` (G, d, 4d), ``w2`` (G, 4d, d), ``g`` (G, d) (with
            ``base``: dW for ``w1`` and ``w2``).
        x: (G, M, d) tokens of each group.
        operand_dtype: the products' operand dtype (``product``).
        base: W_0 per head, ``w1`` (H, d, 4d), ``w2`` (H, 4d, d); G = H * k,
            head-major. ``base.g`` is not read.
        carry: (G,) the factor of W_0 in each group's state.
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.

    Returns:
        (G, M, d) in ``x``'s dtype.
    """
    _check_read_inputs(weights, x, base, carry)
    check_gelu_approximate(gelu_approximate)
    bases = (None, None) if base is None else (base.w1, base.w2)
    return _Read.apply(*weights, x, *bases, carry, operand_dtype, gelu_approximate)


def _mix_backward(inputs: Tensor, weight: Tensor, base: Optional[Tensor],
                  carry: Optional[Tensor], grad: Tensor, mm: Optional[torch.dtype],
                  needs: Sequence[bool], dtype: torch.dtype) -> Tuple[Optional[Tensor], ...]:
    """Cotangents of (inputs, weight, base, carry) of ``mix`` from ``grad``
    (G, M, n), in ``dtype``; ``needs`` says which of the four are wanted."""
    g_, m, k = inputs.shape
    n = grad.shape[-1]
    bar_inputs = bar_weight = bar_base = bar_carry = None
    if needs[0]:
        bar_inputs = product(grad, weight.transpose(-1, -2), mm, dtype)
    if needs[1]:
        bar_weight = product(inputs.transpose(-1, -2), grad, mm, dtype)
    if base is None:
        return bar_inputs, bar_weight, bar_base, bar_carry
    h = base.shape[0]
    scale = carry.view(g_, 1, 1)
    if needs[0] or needs[3]:
        # grad @ base^T gives both: carry's cotangent is sum(inputs * it)
        from_base = torch.bmm(grad.reshape(h, -1, n), base.transpose(-1, -2)).view(g_, m, k)
        if needs[3]:
            bar_carry = (inputs * from_base).sum(dim=(-2, -1))
        if needs[0]:
            bar_inputs.addcmul_(scale, from_base)
    if needs[2]:
        # carry scales the narrower of the two operands
        scaled, other = (inputs * scale, grad) if k <= n else (inputs, grad * scale)
        bar_base = torch.bmm(scaled.reshape(h, -1, k).transpose(-1, -2), other.reshape(h, -1, n))
    return bar_inputs, bar_weight, bar_base, bar_carry


class _Read(torch.autograd.Function):
    """Saves its inputs (w1, w2, g, x, base w1, base w2, carry), w1, w2 and x
    in the products' operand dtype (x in its own for a decomposed read, whose
    W_0 products take it at full precision), and H (G, M, d)."""

    @staticmethod
    def forward(ctx, w1: Tensor, w2: Tensor, g: Tensor, x: Tensor, base_w1: Optional[Tensor],
                base_w2: Optional[Tensor], carry: Optional[Tensor],
                mm: Optional[torch.dtype], approximate: str) -> Tensor:
        ctx.mm, ctx.approximate = mm, approximate
        with no_autocast(x):
            dtype = x.dtype
            x_op = x if base_w1 is not None else operand(x, mm)
            w1, w2 = operand(w1, mm), operand(w2, mm)
            act = F.gelu(mix(x_op, w1, base_w1, carry, mm, dtype), approximate=approximate)
            if base_w1 is None:
                act = operand(act, mm)
            hidden = mix(act, w2, base_w2, carry, mm, dtype)
            ctx.save_for_backward(w1, w2, g, x_op, base_w1, base_w2, carry, hidden)
            normed = F.layer_norm(hidden, hidden.shape[-1:], eps=LN_EPS)
            return torch.addcmul(x, normed, 1.0 + g.unsqueeze(-2))

    @staticmethod
    def backward(ctx, bar_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        first_order_only('read_closed_form')
        w1, w2, g, x, base_w1, base_w2, carry, hidden = ctx.saved_tensors
        need = ctx.needs_input_grad
        mm, approximate, dtype = ctx.mm, ctx.approximate, bar_out.dtype
        # without W_0 apart, the (G, M, 4d) tensors that only products read
        # are cast once or written in their operand dtype
        plain = base_w1 is None
        with no_autocast(x):
            pre = mix(x, w1, base_w1, carry, mm, dtype)
            act = F.gelu(pre, approximate=approximate)
            if plain:
                act = operand(act, mm)
            normed, mean, rstd = torch.native_layer_norm(hidden, hidden.shape[-1:], None, None,
                                                         LN_EPS)
            bar_g = (bar_out * normed).sum(dim=-2) if need[2] else None
            del normed
            bar_hidden = ln_backward(bar_out * (1.0 + g.unsqueeze(-2)), hidden, mean, rstd)
            if plain:
                bar_hidden = operand(bar_hidden, mm)
            bar_act, bar_w2, bar_base_w2, bar_carry2 = _mix_backward(
                act, w2, base_w2, carry, bar_hidden, mm, (True, need[1], need[5], need[6]),
                dtype)
            del act, bar_hidden
            bar_pre = (gelu_grad_operand(bar_act, pre, mm, approximate) if plain else
                       torch.ops.aten.gelu_backward.grad_input(
                           bar_act, pre, approximate=approximate, grad_input=bar_act))
            del pre, bar_act
            bar_x, bar_w1, bar_base_w1, bar_carry1 = _mix_backward(
                x, w1, base_w1, carry, bar_pre, mm, (need[3], need[0], need[4], need[6]), dtype)
            if bar_x is not None:
                bar_x.add_(bar_out)
            bar_carry = None if bar_carry1 is None else bar_carry1.add_(bar_carry2)
        return bar_w1, bar_w2, bar_g, bar_x, bar_base_w1, bar_base_w2, bar_carry, None, None


def _check_read_inputs(weights: MemoryWeights, x: Tensor, base: Optional[MemoryWeights],
                       carry: Optional[Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f'x must be (G, M, d), got shape {tuple(x.shape)}')
    if (base is None) != (carry is None):
        raise ValueError('the decomposed read needs both base and carry')
    g_, _, d = x.shape
    expected = dict(w1=(g_, d, 4 * d), w2=(g_, 4 * d, d), g=(g_, d))
    given = dict(zip(MemoryWeights._fields, weights))
    tensors = dict(x=x, **given)
    if base is not None:
        h = base.w1.shape[0]
        if h == 0 or g_ % h:
            raise ValueError(f'{g_} groups are not a whole number of groups per each of '
                             f'{h} heads')
        expected.update(base_w1=(h, d, 4 * d), base_w2=(h, 4 * d, d), carry=(g_, ))
        given.update(base_w1=base.w1, base_w2=base.w2, carry=carry)
        tensors.update(base_w1=base.w1, base_w2=base.w2, carry=carry)
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f'{name} must have shape {shape} for x of shape '
                             f'{tuple(x.shape)}, got {tuple(given[name].shape)}')
    check_float(**tensors)
