"""The memory's read ``f_W(x)`` as one Triton kernel, a custom operator
``torch.ops.convneur_mm.memory_read`` whose backward is two more
(``torch.ops.convneur_mm.memory_read_backward``)."""
from typing import Optional

import torch
from torch import Tensor

from ..common import MemoryWeights, check_gelu_approximate
from ..kernels.launch import (ReadGrads, base_read_grads, call_kernel_op, cdiv, check_arguments,
                              check_decomposed, check_runnable, empty_read_grads, kernel_op,
                              launch_read, launch_read_backward)

# rows of one launch "chunk" when a read has no chunks of its own: bounds
# the int32 offsets inside a tile
ROWS_PER_PSEUDO_CHUNK = 4096


def read_triton(weights: MemoryWeights, x: Tensor, operand_dtype: Optional[torch.dtype] = None,
                base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None, *,
                block_rows: Optional[int] = None, block_hidden: Optional[int] = None,
                gelu_approximate: str = 'none') -> Tensor:
    """``read_torch`` as one kernel: the (tokens, 4d) hidden activations and
    the LayerNorm stay in registers. Differentiable: its backward kernels
    recompute the forward's intermediates (nothing but the inputs is saved).

    Args:
        weights: per-group fast weights, ``w1`` (G, d, 4d), ``w2`` (G, 4d, d),
            ``g`` (G, d); float32 (with ``base``: dW_t for ``w1`` and ``w2``).
        x: (G, M, d) float32 tokens of each group.
        operand_dtype: dtype of the products' operands (float32, float16,
            bfloat16; None: float32); sums, LayerNorm, GELU and the residual
            stay float32.
        base: W_0 per head, ``w1`` (H, d, 4d), ``w2`` (H, 4d, d), the G groups
            being H heads of G / H groups each, head-major: the read is then
            ``carry * (x @ W_0)`` at float32 accuracy plus ``x @ dW`` in
            ``operand_dtype``, as in ``read_torch``.
        carry: (G,) a_t of each group's state, with ``base``.
        block_rows, block_hidden: tile sizes (powers of two >= 16) overriding
            the defaults, for tuning and tests.
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.

    Returns:
        (G, M, d) float32: ``x + LN(gelu(x @ w1) @ w2) * (1 + g)``.
    """
    w1, w2, g = weights
    operand_dtype = operand_dtype or torch.float32
    check_arguments([('x', x, ('G', 'M', 'd')), ('weights.w1', w1, ('G', 'd', 'h')),
                     ('weights.w2', w2, ('G', 'h', 'd')), ('weights.g', g, ('G', 'd'))] +
                    check_decomposed(base, carry, 'H', ('G',)), operand_dtype,
                    (block_rows, block_hidden))
    groups, m, d = x.shape
    heads = 1 if base is None else base.w1.shape[0]
    if groups % heads:
        raise ValueError(f'{groups} groups are not a whole number per head of {heads} heads')
    check_gelu_approximate(gelu_approximate)
    bases = (None, None) if base is None else (base.w1, base.w2)
    return call_kernel_op(_read_op, _read, w1, w2, g, x, *bases, carry, operand_dtype,
                          block_rows, block_hidden, gelu_approximate)


def _layout(groups: int, m: int, heads: int):
    """How a (G, M) read runs as ``launch_read``'s (H, B, C) states: groups
    as (head, image) pairs, M tokens cut into pseudo-chunks that all read the
    group's weights (chunk stride 0). Returns (length, chunks, split, per_chunk)."""
    length = min(max(m, 1), ROWS_PER_PSEUDO_CHUNK)
    chunks = cdiv(m, length)
    split = lambda t: t.unflatten(0, (heads, groups // heads))  # noqa: E731
    per_chunk = lambda t: split(t)[:, :, None].expand(  # noqa: E731
        heads, groups // heads, chunks, *t.shape[1:])
    return length, chunks, split, per_chunk


def _read(w1: Tensor, w2: Tensor, g: Tensor, x: Tensor, base_w1: Optional[Tensor],
          base_w2: Optional[Tensor], carry: Optional[Tensor], operand_dtype: torch.dtype,
          block_rows: Optional[int], block_hidden: Optional[int],
          gelu_approximate: str = 'none') -> Tensor:
    """The operator's implementation: allocate and launch (checked arguments)."""
    check_runnable(x, operand_dtype)
    groups, m, d = x.shape
    base = None if base_w1 is None else MemoryWeights(base_w1, base_w2, None)
    heads = 1 if base is None else base.w1.shape[0]
    out = torch.empty(groups, m, d, device=x.device, dtype=torch.float32)
    length, chunks, split, per_chunk = _layout(groups, m, heads)
    launch_read(MemoryWeights(per_chunk(w1), per_chunk(w2), per_chunk(g)), split(x), split(out),
                length, operand_dtype, base,
                None if carry is None else split(carry)[:, :, None].expand(-1, -1, chunks),
                block_rows, block_hidden, gelu_approximate)
    return out


def _read_backward(w1: Tensor, w2: Tensor, g: Tensor, x: Tensor, base_w1: Optional[Tensor],
                   base_w2: Optional[Tensor], carry: Optional[Tensor], grad_out: Tensor,
                   operand_dtype: torch.dtype, block_rows: Optional[int],
                   block_hidden: Optional[int], gelu_approximate: str = 'none') -> ReadGrads:
    """The gradients of (w1, w2, g, x, base_w1, base_w2, carry); the last
    three empty for a read that is not decomposed."""
    check_runnable(x, operand_dtype)
    groups, m, d = x.shape
    base = None if base_w1 is None else MemoryWeights(base_w1, base_w2, None)
    heads = 1 if base is None else base.w1.shape[0]
    length, chunks, split, per_chunk = _layout(groups, m, heads)
    grad_x = torch.empty(groups, m, d, device=x.device, dtype=torch.float32)
    carries = None if carry is None else split(carry)[:, :, None].expand(-1, -1, chunks)
    grads = launch_read_backward(
        MemoryWeights(per_chunk(w1), per_chunk(w2), per_chunk(g)), split(x),
        split(grad_out.float()), split(grad_x), length, operand_dtype, base, carries,
        block_rows, block_hidden, gelu_approximate)
    base_grads = base_read_grads(grads, base, carries, x)
    if base is not None:  # a_t's gradient: each group's pseudo-chunks add up
        base_grads = (*base_grads[:2], base_grads[2].sum(dim=2).flatten())
    # the pseudo-chunks of a group share its weights: their gradients add up
    grads = grads.map(lambda t: t.sum(dim=2).flatten(0, 1))
    return (*grads, grad_x, *base_grads)


_read_op = kernel_op('memory_read', _read)
_read_backward_op = kernel_op('memory_read_backward', _read_backward)


@_read_op.register_fake
def _read_fake(w1: Tensor, w2: Tensor, g: Tensor, x: Tensor, base_w1: Optional[Tensor],
               base_w2: Optional[Tensor], carry: Optional[Tensor], operand_dtype: torch.dtype,
               block_rows: Optional[int], block_hidden: Optional[int],
               gelu_approximate: str = 'none') -> Tensor:
    return x.new_empty(x.shape)


@_read_backward_op.register_fake
def _read_backward_fake(w1: Tensor, w2: Tensor, g: Tensor, x: Tensor, base_w1: Optional[Tensor],
                        base_w2: Optional[Tensor], carry: Optional[Tensor], grad_out: Tensor,
                        operand_dtype: torch.dtype, block_rows: Optional[int],
                        block_hidden: Optional[int], gelu_approximate: str = 'none') -> ReadGrads:
    return empty_read_grads(w1, w2, g, x.new_empty(x.shape), base_w1, base_w2, carry)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs[:7])
    ctx.options = inputs[7:]


def _backward(ctx, grad_out: Tensor) -> tuple:
    saved = ctx.saved_tensors
    grads = list(call_kernel_op(_read_backward_op, _read_backward, *saved, grad_out,
                                *ctx.options))
    if saved[4] is None:  # not decomposed
        grads[4:] = [None] * 3
    return (*grads, None, None, None, None)


_read_op.register_autograd(_backward, setup_context=_setup_context)
