"""The chunk read as one Triton kernel, a custom operator
``torch.ops.convneur_mm.memory_chunk_read`` whose backward is two more
(``torch.ops.convneur_mm.memory_chunk_read_backward``)."""
from typing import Optional

import torch
from torch import Tensor

from ..common import MemoryWeights, check_gelu_approximate
from ..kernels.ops import (call_kernel_op, check_arguments, check_decomposed, check_runnable,
                           kernel_op, register_first_order_autograd)
from ..kernels.tiles import cdiv
from ..read.triton import (ReadGrads, base_read_grads, empty_read_grads, launch_read,
                           launch_read_backward)


def chunk_read_triton(states: MemoryWeights, queries: Tensor, chunk_size: int,
                      operand_dtype: Optional[torch.dtype] = None,
                      base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None,
                      *, block_rows: Optional[int] = None,
                      block_hidden: Optional[int] = None,
                      gelu_approximate: str = 'none') -> Tensor:
    """``chunk_read_torch`` as one kernel. The output is written straight into
    the merged (B, N, H * d) layout, so neither the queries' padding to whole
    chunks nor the heads' merge copies. Differentiable: its backward kernels
    recompute the forward's intermediates (nothing but the inputs is saved),
    and the queries' gradient is written in the output's merged layout.

    Args:
        states: per-chunk fast weights ``w1`` (H, B, C, d, 4d),
            ``w2`` (H, B, C, 4d, d), ``g`` (H, B, C, d); float32 (``w1`` and
            ``w2`` also in ``operand_dtype``, as the scan kernel writes
            them), any strides (expanded views work); with ``base``: dW_t
            for ``w1`` and ``w2``.
        queries: (H, B, N, d) float32, any strides; N <= C * chunk_size.
        chunk_size: tokens per chunk L.
        operand_dtype: dtype of the products' operands (float32, float16,
            bfloat16; None: float32); sums, LayerNorm, GELU and the residual
            stay float32.
        base: W_0 per head, ``w1`` (H, d, 4d), ``w2`` (H, 4d, d): the read is
            then ``q @ (carry * W_0 + dW)`` at float32 accuracy, the kernels
            forming that state tile by tile in float32 registers (the
            backward's weight gradients keep ``operand_dtype``).
        carry: (H, B, C) a_t of each state, with ``base``.
        block_rows, block_hidden: tile sizes (powers of two >= 16) overriding
            the defaults, for tuning and tests.
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.

    Returns:
        (B, N, H * d) float32 read-outs, heads merged.
    """
    w1, w2, g = states
    operand_dtype = operand_dtype or torch.float32
    check_arguments([('queries', queries, ('H', 'B', 'N', 'd')),
                     ('states.w1', w1, ('H', 'B', 'C', 'd', 'h')),
                     ('states.w2', w2, ('H', 'B', 'C', 'h', 'd')),
                     ('states.g', g, ('H', 'B', 'C', 'd'))] +
                    check_decomposed(base, carry, 'H', ('H', 'B', 'C')), operand_dtype,
                    (block_rows, block_hidden), operands=('states.w1', 'states.w2'))
    n, chunks = queries.shape[2], w1.shape[2]
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    if n > chunks * chunk_size:
        raise ValueError(f'{n} tokens need {cdiv(n, chunk_size)} chunk states of '
                         f'{chunk_size} tokens, got {chunks}')
    check_gelu_approximate(gelu_approximate)
    bases = (None, None) if base is None else (base.w1, base.w2)
    return call_kernel_op(_chunk_read_op, _chunk_read, w1, w2, g, queries, chunk_size, *bases,
                          carry, operand_dtype, block_rows, block_hidden, gelu_approximate)


def _chunk_read(w1: Tensor, w2: Tensor, g: Tensor, queries: Tensor, chunk_size: int,
                base_w1: Optional[Tensor], base_w2: Optional[Tensor], carry: Optional[Tensor],
                operand_dtype: torch.dtype, block_rows: Optional[int],
                block_hidden: Optional[int], gelu_approximate: str = 'none') -> Tensor:
    """The operator's implementation: allocate and launch (checked arguments)."""
    check_runnable(queries, operand_dtype)
    heads, batch, n, d = queries.shape
    base = None if base_w1 is None else MemoryWeights(base_w1, base_w2, None)
    out = torch.empty(batch, n, heads * d, device=queries.device, dtype=torch.float32)
    launch_read(MemoryWeights(w1, w2, g), queries,
                out.view(batch, n, heads, d).permute(2, 0, 1, 3), chunk_size, operand_dtype,
                base, carry, block_rows, block_hidden, gelu_approximate)
    return out


def _chunk_read_backward(w1: Tensor, w2: Tensor, g: Tensor, queries: Tensor, chunk_size: int,
                         base_w1: Optional[Tensor], base_w2: Optional[Tensor],
                         carry: Optional[Tensor], grad_out: Tensor, operand_dtype: torch.dtype,
                         block_rows: Optional[int], block_hidden: Optional[int],
                         gelu_approximate: str = 'none') -> ReadGrads:
    """The gradients of (w1, w2, g, queries, base_w1, base_w2, carry); the
    last three empty for a read that is not decomposed."""
    check_runnable(queries, operand_dtype)
    heads, batch, n, d = queries.shape
    base = None if base_w1 is None else MemoryWeights(base_w1, base_w2, None)
    grad_queries = _merged_queries(queries)
    grads = launch_read_backward(MemoryWeights(w1, w2, g), queries,
                                 grad_out.float().unflatten(-1, (heads, d)).permute(2, 0, 1, 3),
                                 grad_queries, chunk_size, operand_dtype, base, carry,
                                 block_rows, block_hidden, gelu_approximate)
    return (*grads, grad_queries, *base_read_grads(grads, base, carry, queries))


def _merged_queries(queries: Tensor) -> Tensor:
    """An (H, B, N, d) tensor in the merged (B, N, H * d) layout, as the
    projections make the queries: their gradient then flows back uncopied."""
    heads, batch, n, d = queries.shape
    return queries.new_empty(batch, n, heads, d, dtype=torch.float32).permute(2, 0, 1, 3)


_chunk_read_op = kernel_op('memory_chunk_read', _chunk_read)
_chunk_read_backward_op = kernel_op('memory_chunk_read_backward', _chunk_read_backward)


@_chunk_read_op.register_fake
def _chunk_read_fake(w1: Tensor, w2: Tensor, g: Tensor, queries: Tensor, chunk_size: int,
                     base_w1: Optional[Tensor], base_w2: Optional[Tensor],
                     carry: Optional[Tensor], operand_dtype: torch.dtype,
                     block_rows: Optional[int], block_hidden: Optional[int],
                     gelu_approximate: str = 'none') -> Tensor:
    heads, batch, n, d = queries.shape
    return queries.new_empty(batch, n, heads * d)


@_chunk_read_backward_op.register_fake
def _chunk_read_backward_fake(w1: Tensor, w2: Tensor, g: Tensor, queries: Tensor,
                              chunk_size: int, base_w1: Optional[Tensor],
                              base_w2: Optional[Tensor], carry: Optional[Tensor],
                              grad_out: Tensor, operand_dtype: torch.dtype,
                              block_rows: Optional[int], block_hidden: Optional[int],
                              gelu_approximate: str = 'none') -> ReadGrads:
    return empty_read_grads(w1, w2, g, _merged_queries(queries), base_w1, base_w2, carry)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    w1, w2, g, queries, chunk_size, base_w1, base_w2, carry = inputs[:8]
    ctx.save_for_backward(w1, w2, g, queries, base_w1, base_w2, carry)
    ctx.chunk_size, ctx.options = chunk_size, inputs[8:]


def _backward(ctx, grad_out: Tensor) -> tuple:
    w1, w2, g, queries, base_w1, base_w2, carry = ctx.saved_tensors
    grads = list(call_kernel_op(_chunk_read_backward_op, _chunk_read_backward, w1, w2, g,
                                queries, ctx.chunk_size, base_w1, base_w2, carry, grad_out,
                                *ctx.options))
    if base_w1 is None:
        grads[4:] = [None] * 3
    return (*grads[:4], None, *grads[4:], None, None, None, None)


register_first_order_autograd(_chunk_read_op, _backward, _setup_context)
