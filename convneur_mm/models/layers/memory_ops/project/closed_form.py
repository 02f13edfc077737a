"""``project_torch`` as a ``torch.autograd.Function`` with a hand-derived
backward: the form the PyTorch path trains with (``backward='closed_form'``).

Autograd through ``project_torch`` writes a zero-padded (B, N, 4d + H)
gradient for each slice of the product it reads and joins them. This
backward writes each column group's gradient straight into one such buffer
(in the products' operand dtype, the rows past the written chunks zeroed
once; under torch.compile one cat of the groups, ``_ProductGradient``) and
takes it through the two products and x's RMSNorm. First order
only: differentiating it with ``create_graph=True`` raises.

Notation: n = x rstd(x) (``rstd(t) = (mean(t^2) + eps)^-1/2`` per row),
P = n W^T + b, split into the queries' and keys' heads Z (normed per head,
times ``gamma``), values, the pool's logits (softmax over each chunk's L
rows: A) and the step sizes' logits (``max_lr * sigmoid``). The pooled rows
are ``p = sum_L A n``; their cotangent q gives the logits ``A (n - p) q``
(whose bias therefore gets none: the sum over L is p - p) and n ``A q``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import RMS_EPS, first_order_only, no_autocast, operand, product
from .pytorch import project_torch
from .weights import Projected, ProjectionWeights, check_projection_arguments, fold


def project_closed_form(x: Tensor, weights: ProjectionWeights, num_updates: int,
                        chunk_size: int, max_lr: float,
                        operand_dtype: Optional[torch.dtype] = None, *,
                        exact_queries: bool = False) -> Projected:
    """``project_torch`` with a closed-form backward; the arguments and
    results as there. Gradients flow to ``x`` and every weight; the
    backward's products take ``operand_dtype`` whatever ``exact_queries``
    (the gradients' accuracy of any 16-bit training). Without writes
    (``num_updates`` 0: queries alone) it is ``project_torch``."""
    check_projection_arguments(x, weights, num_updates, chunk_size)
    if num_updates == 0:
        return project_torch(x, weights, num_updates, chunk_size, max_lr, operand_dtype,
                             exact_queries=exact_queries)
    heads = weights.query_gamma.shape[0]
    folded = fold(weights)
    # the product and its gradients read the rows flat: a permuted map (B, C, H, W ->
    # B, N, C) is copied once, as ``project_torch``'s reshape copies it
    queries, keys, values, token_lr, pooled = _Project.apply(
        x.contiguous(), folded.weight, folded.bias, folded.gamma, num_updates, chunk_size,
        max_lr, operand_dtype, exact_queries)
    return Projected(queries.permute(2, 0, 1, 3), keys.permute(2, 0, 1, 3),
                     values.unflatten(-1, (heads, -1)).permute(2, 0, 1, 3),
                     token_lr.permute(2, 0, 1), pooled * weights.store_norm)


def _rstd(t: Tensor) -> Tensor:
    """(mean(t^2) + eps)^-1/2 over the last dim, kept (``F.rms_norm``'s)."""
    return t.square().mean(-1, keepdim=True).add_(RMS_EPS).rsqrt_()


def _rms_backward(grad: Tensor, normed: Tensor, rstd: Tensor,
                  out: Optional[Tensor] = None) -> Tensor:
    """The input gradient of ``normed = t rstd(t)`` from ``grad`` at it:
    ``rstd (grad - normed mean(grad normed))``, computed in ``grad``'s
    storage and multiplied into ``out`` (a strided slice: ``_into``), else
    into ``grad``."""
    mean = (grad * normed).mean(-1, keepdim=True)
    grad.addcmul_(normed, mean, value=-1.0)
    return grad.mul_(rstd) if out is None else _into(out, torch.mul, grad, rstd)


def _into(out: Optional[Tensor], op, *args: Tensor) -> Tensor:
    """``op(*args)`` written into ``out``, a strided slice of a larger
    tensor: by ``out=`` in eager mode; under torch.compile, which takes no
    strided ``out=``, as a copy that Inductor fuses into the op. None: a new
    tensor."""
    if out is None:
        return op(*args)
    if torch.compiler.is_compiling():
        return out.copy_(op(*args))
    return op(*args, out=out)


def _heads_backward(grad: Tensor, raw: Tensor, rstd: Tensor, gamma: Tensor,
                    out: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-head RMSNorm times ``gamma`` (H, hd), from ``grad`` at its output
    (B, M, H, hd): gamma's gradient, and the raw heads' written into ``out``
    (None: a new tensor)."""
    normed = raw * rstd
    grad_gamma = (grad * normed).sum((0, 1))
    return grad_gamma, _rms_backward(grad * gamma, normed, rstd, out)


class _Project(torch.autograd.Function):
    """Saves x, W, gamma, n and rstd(x), the product P (biases added), the
    heads' rstd, the step sizes and the pooled rows."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, u: int, L: int,
                max_lr: float, mm: Optional[torch.dtype], exact_queries: bool
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output costs no zero tensor
        ctx.options = (u, L, max_lr, mm)
        with no_autocast(x):
            b, n, d = x.shape
            heads, T = gamma.shape[0] // 2, u * L
            rstd = _rstd(x)
            normed = x * rstd
            proj = product(operand(normed, mm).view(1, b * n, d), weight.t().unsqueeze(0), mm,
                           x.dtype).view(b, n, -1)
            if exact_queries and mm is not None:
                # the queries again at full precision: one more (d, d) product beats
                # splitting proj, which the backward reads whole
                proj[..., :d] = product(normed.view(1, b * n, d), weight[:d].t().unsqueeze(0),
                                        None, x.dtype).view(b, n, d)
            proj[..., 3 * d:].add_(bias)  # the logits' and step sizes' biases
            raw = proj[..., :2 * d].unflatten(-1, (2 * heads, -1))
            head_rstd = _rstd(raw)
            qk = (raw * head_rstd).mul_(gamma)
            token_lr = torch.sigmoid(proj[:, :T, 4 * d:]).mul_(max_lr)
            attn = proj[:, :T, 3 * d:4 * d].reshape(b, u, L, d).softmax(dim=-2)
            pooled = (normed[:, :T].reshape(b, u, L, d) * attn).sum(dim=-2)
            del attn
            ctx.save_for_backward(x, weight, gamma, normed, rstd, proj, head_rstd, token_lr,
                                  pooled)
            return qk[:, :, :heads], qk[:, :T, heads:], proj[:, :T, 2 * d:3 * d], token_lr, pooled

    @staticmethod
    def backward(ctx, bar_queries: Optional[Tensor], bar_keys: Optional[Tensor],
                 bar_values: Optional[Tensor], bar_lr: Optional[Tensor],
                 bar_pooled: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        first_order_only('project_closed_form')
        x, weight, gamma, normed, rstd, proj, head_rstd, token_lr, pooled = ctx.saved_tensors
        u, L, max_lr, mm = ctx.options
        with no_autocast(x):
            grads = _project_backward(x, weight, gamma, normed, rstd, proj, head_rstd,
                                      token_lr, pooled, u, L, max_lr, mm,
                                      (bar_queries, bar_keys, bar_values, bar_lr, bar_pooled))
        return tuple(grad if need else None
                     for grad, need in zip(grads, ctx.needs_input_grad)) + (None, ) * 5


def _project_backward(x: Tensor, weight: Tensor, gamma: Tensor, normed: Tensor, rstd: Tensor,
                      proj: Tensor, head_rstd: Tensor, token_lr: Tensor, pooled: Tensor, u: int,
                      L: int, max_lr: float, mm: Optional[torch.dtype],
                      bars: Tuple[Optional[Tensor], ...]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cotangents of (x, W, b, gamma) from those of the five outputs
    (None: unused)."""
    bar_queries, bar_keys, bar_values, bar_lr, bar_pooled = bars
    b, n, d = x.shape
    heads, T, dtype = gamma.shape[0] // 2, u * L, x.dtype
    # P's gradient, read by two products only: in their operand dtype
    columns = _ProductGradient(proj, T, heads, mm or dtype)
    raw = proj[..., :2 * d].unflatten(-1, (2 * heads, -1))
    grad_gamma = torch.zeros_like(gamma)
    for group, half, bar in ((0, slice(None, heads), bar_queries),
                             (1, slice(heads, None), bar_keys)):
        grad = None
        if bar is not None:
            rows, out = columns.rows_of(group), columns.slot(group)
            grad_gamma[half], grad = _heads_backward(
                bar, raw[:, rows, half], head_rstd[:, rows, half], gamma[half],
                None if out is None else out.unflatten(-1, (heads, -1)))
        columns.put(group, grad, in_slot=True)
    columns.put(2, bar_values)
    # the step sizes: d/dz max_lr sigmoid(z) = t (1 - t / max_lr)
    bar_z = None
    if bar_lr is None:
        grad_lr_bias = token_lr.new_zeros(heads)
    else:
        bar_z = torch.mul(token_lr, -1.0 / max_lr).add_(1.0).mul_(token_lr).mul_(bar_lr)
        grad_lr_bias = bar_z.sum((0, 1))
    columns.put(4, bar_z)
    chunks = normed[:, :T].reshape(b, u, L, d)
    pool_term = bar_logits = None
    if bar_pooled is not None:
        attn = proj[:, :T, 3 * d:4 * d].reshape(b, u, L, d).softmax(dim=-2)
        bar_p = bar_pooled.unsqueeze(-2)
        out = columns.slot(3)
        bar_logits = _into(None if out is None else out.view(b, u, L, d), torch.mul,
                           (chunks - pooled.unsqueeze(-2)).mul_(bar_p), attn)
        pool_term = attn.mul_(bar_p)  # n's share from the pool: A q
    columns.put(3, bar_logits, in_slot=True)
    bar_proj = columns.joined()
    del columns
    # exactly zero: sum_L A (n - p) = p - p (a softmax does not see a shift)
    grad_logits_bias = pooled.new_zeros(d)
    flat = bar_proj.view(1, b * n, -1)
    grad_weight = product(flat.transpose(1, 2), operand(normed, mm).view(1, b * n, d), mm,
                          dtype)[0]
    bar_normed = product(flat, weight.unsqueeze(0), mm, dtype).view(b, n, d)
    del flat, bar_proj
    if pool_term is None:
        pass
    elif torch.compiler.is_compiling():  # an add into a slice would copy the whole tensor
        bar_normed = bar_normed + F.pad(pool_term.reshape(b, T, d), (0, 0, 0, n - T))
    else:
        bar_normed[:, :T].view(b, u, L, d).add_(pool_term)
    grad_x = _rms_backward(bar_normed, normed, rstd)
    return grad_x, grad_weight, torch.cat([grad_logits_bias, grad_lr_bias]), grad_gamma


class _ProductGradient:
    """P's cotangent (B, N, 4d + H), one column group at a time: the queries'
    heads, the keys', the values, the pool's logits (d columns each) and the
    step sizes' logits (H); every group but the queries' is zero past the
    ``written`` rows. Eagerly each group's last kernel writes its slice of
    one buffer (``slot``); under torch.compile a slice write copies the whole
    buffer, so the groups are joined by one cat (``joined``), which Inductor
    lowers to each group's kernel writing its slice."""

    def __init__(self, proj: Tensor, written: int, heads: int, dtype: torch.dtype):
        self.rows, width = proj.shape[1], proj.shape[2]
        self._proj, self.written, self.dtype = proj, written, dtype
        self.widths = [(width - heads) // 4] * 4 + [heads]
        self.groups: dict = {}
        self.buffer = None
        if not torch.compiler.is_compiling():
            self.buffer = torch.empty(proj.shape, dtype=dtype, device=proj.device)
            self.buffer[:, written:, self.widths[0]:].zero_()

    def rows_of(self, group: int) -> slice:
        """The rows a group's gradient has: all for the queries, else the written."""
        return slice(None) if group == 0 else slice(None, self.written)

    def slot(self, group: int) -> Optional[Tensor]:
        """Eagerly, where group ``group``'s rows go; compiling, None."""
        if self.buffer is None:
            return None
        start = sum(self.widths[:group])
        return self.buffer[:, self.rows_of(group), start:start + self.widths[group]]

    def put(self, group: int, grad: Optional[Tensor], in_slot: bool = False) -> None:
        """Group ``group``'s gradient: ``grad`` (``in_slot``: eagerly already
        written in its slot), or zeros for None."""
        if self.buffer is None:
            count = self.rows if group == 0 else self.written
            self.groups[group] = (grad.reshape(grad.shape[0], count, self.widths[group])
                                  if grad is not None else None)
        elif grad is None:
            self.slot(group).zero_()
        elif not in_slot:
            self.slot(group).copy_(grad)

    def joined(self) -> Tensor:
        if self.buffer is not None:
            return self.buffer
        # each group padded to every row, then one cat: a pointwise cat of
        # pointwise inputs, which Inductor computes in one kernel
        groups = [self.groups[i] if self.groups[i] is not None else self._proj.new_zeros(
            self._proj.shape[0], self.rows if i == 0 else self.written, self.widths[i])
            for i in range(5)]
        groups[1:] = [F.pad(t, (0, 0, 0, self.rows - self.written)) for t in groups[1:]]
        return torch.cat(groups, dim=-1).to(self.dtype)
