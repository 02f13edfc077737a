"""The memory's read ``f_W(x)`` as one Triton kernel, a custom operator
``torch.ops.convneur_mm.memory_read`` whose backward is two more
(``torch.ops.convneur_mm.memory_read_backward``), and the launchers of those
kernels (``launch_read``, ``launch_read_backward``), which the chunk read
shares."""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..common import LN_EPS, MemoryWeights, check_gelu_approximate
from ..kernels.launcher import launch_config, launch_kernel, multiprocessors, target_arch
from ..kernels.ops import (as_operands, call_kernel_op, check_arguments, check_decomposed,
                           check_runnable, check_span, gelu_tanh, kernel_op,
                           register_first_order_autograd)
from ..kernels.tiles import TAIL_ROWS, cdiv, chosen_kernel, row_parts, tile_config

# rows of one launch "chunk" when a read has no chunks of its own: bounds
# the int32 offsets inside a tile
ROWS_PER_PSEUDO_CHUNK = 4096


class _ReadOperands(NamedTuple):
    """What the read kernels take of the states and of a decomposed read."""
    w1: Tensor
    w2: Tensor
    g: Tensor
    base_w1: Tensor
    base_w2: Tensor
    carry_strides: Tuple[int, ...]


def _read_operands(weights: MemoryWeights, base: Optional[MemoryWeights],
                   carry: Optional[Tensor], operand_dtype: torch.dtype) -> _ReadOperands:
    """The read kernels' weights, and W_0 and a_t's strides (any pointers
    and strides where the read is not decomposed: DECOMPOSED is a constexpr,
    they are never read)."""
    w1, w2, g = weights
    if w1.shape[2] == 1 or 0 in w1.stride():
        # W_0 (one state, or broadcast over images) is cast once; per-chunk states are
        # not copied (a 16-bit copy would add half their bytes to the peak): the scan
        # kernel writes them in the operand dtype, else they load as float32
        w1, w2 = as_operands(w1, operand_dtype), as_operands(w2, operand_dtype)
    if base is None:
        return _ReadOperands(w1, w2, g, w1[:, 0, 0], w2[:, 0, 0], (0, 0, 0))
    return _ReadOperands(w1, w2, g, base.w1, base.w2, carry.stride())


def launch_read(weights: MemoryWeights, x: Tensor, out: Tensor, length: int,
                operand_dtype: torch.dtype, base: Optional[MemoryWeights],
                carry: Optional[Tensor], block_rows: Optional[int],
                block_hidden: Optional[int], gelu_approximate: str = 'none') -> Tensor:
    """Launch the read kernel: x and out (H, B, N, d), weights (H, B, C, ...),
    base (H, ...) or None, carry (H, B, C) or None; token n reads chunk
    n // length; GELU as ``F.gelu(approximate=gelu_approximate)``. Returns ``out``."""
    w1, w2, g, b1, b2, c_strides = _read_operands(weights, base, carry, operand_dtype)
    heads, batch, n, d = x.shape
    chunks, hidden = w1.shape[2], w1.shape[-1]
    if out.numel() == 0:
        return out
    check_span('x', length, x)
    check_span('out', length, out)
    decomposed = base is not None
    tiles = tile_config('read', d, min(length, n), block_rows, block_hidden, operand_dtype,
                        decomposed, arch=target_arch(x.device))
    kernels, cfg = launch_config('read', operand_dtype, x.device)
    for r0, row_blocks, part in row_parts(min(length, n), tiles):
        launch_kernel(
            kernels.read_kernel, heads * batch * chunks * row_blocks, part, x.device,
            x, w1, w2, g, out, b1, b2, carry if decomposed else x,
            batch, chunks, n, length, d, hidden, row_blocks, r0,
            *x.stride(), *w1.stride(), *w2.stride(), *g.stride(), *out.stride(),
            *b1.stride(), *b2.stride(), *c_strides,
            LN_EPS, DECOMPOSED=decomposed, **cfg, GELU_TANH=gelu_tanh(gelu_approximate))
    return out


# a read's gradients, of (w1, w2, g, inputs, base w1, base w2, carry): a
# custom operator returns a fixed number of tensors (empty where unused)
ReadGrads = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def launch_read_backward(weights: MemoryWeights, x: Tensor, grad_out: Tensor, grad_x: Tensor,
                         length: int, operand_dtype: torch.dtype, base: Optional[MemoryWeights],
                         carry: Optional[Tensor], block_rows: Optional[int],
                         block_hidden: Optional[int], gelu_approximate: str = 'none'
                         ) -> MemoryWeights:
    """Launch the read's two backward kernels, layouts as ``launch_read``'s
    (``grad_out`` as ``out``; ``grad_x`` as ``x``, written), or where
    ``tiles.chosen_kernel('read_backward_chunk', ...)`` one program per state
    that runs both. The (tokens, 4d)
    intermediates are recomputed, not saved, as FlashAttention's backward does.

    Returns:
        The weights' gradients per state, (H, B, C, d, 4d), (H, B, C, 4d, d)
        in the states' dtypes (float32 with ``base``: those of dW_t, equal
        to those of the whole state, which W_0's and a_t's sum), and
        (H, B, C, d) float32.
    """
    w1, w2, g, b1, b2, c_strides = _read_operands(weights, base, carry, operand_dtype)
    heads, batch, n, d = x.shape
    chunks, hidden = w1.shape[2], w1.shape[-1]
    opts = dict(device=x.device, dtype=torch.float32)
    grads = MemoryWeights(*(torch.empty(shape, device=x.device,
                                        dtype=state_grad_dtype(t, base is not None))
                            for shape, t in (((heads, batch, chunks, d, hidden), weights.w1),
                                             ((heads, batch, chunks, hidden, d), weights.w2))),
                          torch.empty(heads, batch, chunks, d, **opts))
    if grad_x.numel() == 0 or hidden == 0:
        return grads.map(torch.Tensor.zero_)
    for name, t in (('x', x), ('grad_out', grad_out), ('grad_x', grad_x)):
        check_span(name, length, t)
    check_span('the gradient at the MLP output', length, x.new_empty(0, d))
    decomposed = base is not None
    arch = target_arch(x.device)
    rows = min(length, n)  # a chunk's rows, as launched
    states = heads * batch * chunks
    one_program = chosen_kernel('read_backward_chunk', d, operand_dtype, arch, decomposed,
                                states, multiprocessors(x.device))
    tiles = tile_config('read_backward_chunk' if one_program else 'read_backward_rows', d, rows,
                        block_rows, block_hidden, operand_dtype, decomposed, arch=arch)
    kernels, cfg = launch_config('read', operand_dtype, x.device)
    parts = row_parts(rows, tiles)
    d_out = torch.empty(heads, batch, chunks, length, d, device=x.device, dtype=operand_dtype)
    # each block's share of g's gradient, summed in a fixed order below
    row_blocks = sum(blocks for _, blocks, _ in parts)
    d_g = torch.empty(states, row_blocks, d, **opts)
    gelu = gelu_tanh(gelu_approximate)
    carry_arg = carry if decomposed else x  # any pointer where the read is not decomposed
    if one_program:  # both passes, a program per state
        launch_kernel(
            kernels.read_backward_chunk_kernel, states, tiles, x.device,
            x, grad_out, w1, w2, g, grad_x, d_out, d_g, grads.w1, grads.w2, b1, b2, carry_arg,
            batch, chunks, n, length, rows, d, hidden, row_blocks,
            *x.stride(), *w1.stride(), *w2.stride(), *g.stride(), *grad_out.stride(),
            *grad_x.stride(), *b1.stride(), *b2.stride(), *c_strides,
            LN_EPS, DECOMPOSED=decomposed, **cfg, TAIL=TAIL_ROWS, GELU_TANH=gelu)
    else:
        slot0 = 0
        for r0, blocks, part in parts:
            launch_kernel(
                kernels.read_backward_rows_kernel, states * blocks, part, x.device,
                x, grad_out, w1, w2, g, grad_x, d_out, d_g, b1, b2, carry_arg,
                batch, chunks, n, length, d, hidden, blocks, r0, slot0, row_blocks,
                *x.stride(), *w1.stride(), *w2.stride(), *g.stride(), *grad_out.stride(),
                *grad_x.stride(), *b1.stride(), *b2.stride(), *c_strides,
                LN_EPS, DECOMPOSED=decomposed, **cfg, GELU_TANH=gelu)
            slot0 += blocks
        cols = tile_config('read_backward_cols', d, rows, block_rows, block_hidden,
                           operand_dtype, decomposed, arch=arch)
        hidden_blocks = cdiv(hidden, cols['BH'])
        launch_kernel(
            kernels.read_backward_cols_kernel, states * hidden_blocks, cols, x.device,
            x, d_out, w1, w2, grads.w1, grads.w2, b1, b2, carry_arg,
            batch, chunks, n, length, d, hidden, hidden_blocks,
            *x.stride(), *w1.stride(), *w2.stride(), *b1.stride(), *b2.stride(), *c_strides,
            DECOMPOSED=decomposed, **cfg, TAIL=TAIL_ROWS, GELU_TANH=gelu)
    torch.sum(d_g.view(heads, batch, chunks, row_blocks, d), dim=3, out=grads.g)
    return grads


def base_read_grads(grads: MemoryWeights, base: Optional[MemoryWeights],
                    carry: Optional[Tensor], like: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """A read operator's gradients of W_0 and a_t: ``decomposed_read_grads``,
    or three empty tensors like ``like`` where the read is not decomposed
    (three: an operator's outputs may not alias)."""
    if base is None:
        return tuple(like.new_empty(0) for _ in range(3))
    return decomposed_read_grads(grads, base, carry)


def state_grad_dtype(state: Tensor, decomposed: bool) -> torch.dtype:
    """The dtype of w1's or w2's per-state gradient: the state's, but
    float32 for a decomposed read (W_0's and a_t's gradients sum it)."""
    return torch.float32 if decomposed else state.dtype


def empty_read_grads(w1: Tensor, w2: Tensor, g: Tensor, grad_inputs: Tensor,
                     base_w1: Optional[Tensor], base_w2: Optional[Tensor],
                     carry: Optional[Tensor]) -> ReadGrads:
    """A read backward operator's results, empty, in their shapes (its fake),
    ``grad_inputs`` the inputs' gradient as the operator lays it out."""
    new = grad_inputs.new_empty
    like = lambda t: new(0) if t is None else new(t.shape)  # noqa: E731
    state = lambda t: new(t.shape, dtype=state_grad_dtype(t, base_w1 is not None))  # noqa: E731
    return (state(w1), state(w2), new(g.shape), grad_inputs, like(base_w1), like(base_w2),
            like(carry))


def decomposed_read_grads(grads: MemoryWeights, base: MemoryWeights, carry: Tensor
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """A decomposed read's gradients of W_0 and a_t from those of its states
    W_t = a_t W_0 + dW_t (``launch_read_backward``'s, (H, B, C, ...)):
    W_0's is sum a_t dW-gradient over each head's states, a_t's the inner
    product of the state's gradient with W_0.

    Returns:
        base w1 (H, d, 4d), base w2 (H, 4d, d), carry (H, B, C) gradients.
    """
    heads = base.w1.shape[0]
    per_head = lambda t: t.reshape(heads, -1, *t.shape[3:])  # noqa: E731
    weights = carry.reshape(heads, 1, -1)
    grad_base = [torch.bmm(weights, per_head(grad).flatten(2)).view(base_t.shape)
                 for grad, base_t in ((grads.w1, base.w1), (grads.w2, base.w2))]
    grad_carry = sum(torch.bmm(per_head(grad).flatten(2), base_t.reshape(heads, -1, 1))
                     for grad, base_t in ((grads.w1, base.w1), (grads.w2, base.w2)))
    return grad_base[0], grad_base[1], grad_carry.view(carry.shape)


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
            ``x @ (carry * W_0 + dW)`` at float32 accuracy (``read_torch``
            computes ``carry * (x @ W_0)`` plus a 16-bit ``x @ dW``; the
            kernels form the state tile by tile in float32 registers).
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


register_first_order_autograd(_read_op, _backward, _setup_context)
