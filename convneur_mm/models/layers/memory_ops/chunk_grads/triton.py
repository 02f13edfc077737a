"""Every chunk's write gradient as two Triton kernels (forward only), a
custom operator ``torch.ops.convneur_mm.memory_chunk_grads``."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common import LN_EPS, MemoryWeights
from ..kernels.launch import (as_operands, call_kernel_op, cdiv, check_arguments, check_runnable,
                              check_span, launch_config, target_arch, tile_config)


def chunk_grads_triton(weights: MemoryWeights, keys: Tensor, values: Tensor, token_lr: Tensor,
                       operand_dtype: Optional[torch.dtype] = None, *,
                       block_rows: Optional[int] = None,
                       block_hidden: Optional[int] = None) -> MemoryWeights:
    """``chunk_grads_torch`` as two kernels (forward only, for inference: no
    autograd graph is recorded).

    Pass 1 runs per block of a chunk's rows: the MLP at the shared weights, its
    LayerNorm and the closed-form LayerNorm backward in registers, writing
    only the (tokens, d) gradient at the MLP's output (in ``operand_dtype``,
    which pass 2 multiplies it in) and per-block partial
    sums of d_g. Pass 2 runs per (chunk, block of hidden units): it recomputes
    that block of ``keys @ w1`` and accumulates its slices of the chunk's
    G1 and G2 in float32 registers. No (tokens, 4d) tensor reaches memory,
    and keys, values and step sizes are read where they lie (any strides):
    no copy of them is made.

    Args:
        weights: fast weights shared by all chunks of a group: ``w1`` (G, d, 4d),
            ``w2`` (G, 4d, d), ``g`` (G, d); float32.
        keys, values: (G, C, L, d) float32: C chunks of L tokens per group;
            or (G, B, U, L, d), the C = B * U chunks as U per image, in any
            strides (the projections' views of B images).
        token_lr: (G, C, L) or (G, B, U, L) float32 per-token step sizes theta_i.
        operand_dtype: dtype of the products' operands (float32, float16,
            bfloat16; None: float32); sums, LayerNorm and GELU stay float32.
        block_rows, block_hidden: tile sizes (powers of two >= 16) overriding
            the defaults, for tuning and tests.

    Returns:
        float32 gradients of ``sum_i theta_i / d * ||f_W(k_i) - v_i||^2`` per
        chunk: (G, C, d, 4d), (G, C, 4d, d), (G, C, d).
    """
    w1, w2, g = weights
    operand_dtype = operand_dtype or torch.float32
    per_image_chunks = keys.dim() == 5
    lead = ('G', 'B', 'U') if per_image_chunks else ('G', 'C')
    check_arguments([('keys', keys, (*lead, 'L', 'd')), ('values', values, (*lead, 'L', 'd')),
                     ('token_lr', token_lr, (*lead, 'L')), ('weights.w1', w1, ('G', 'd', 'h')),
                     ('weights.w2', w2, ('G', 'h', 'd')), ('weights.g', g, ('G', 'd'))],
                    operand_dtype, (block_rows, block_hidden))
    return MemoryWeights(*call_kernel_op(_chunk_grads_op, _chunk_grads, w1, w2, g, keys, values,
                                         token_lr, operand_dtype, block_rows, block_hidden))


def _sizes(keys: Tensor) -> Tuple[int, int, int, int, int]:
    """(groups, chunks, chunks per image, rows L, width d) of 4-D or 5-D keys."""
    groups, length, d = keys.shape[0], keys.shape[-2], keys.shape[-1]
    if keys.dim() == 5:
        return groups, keys.shape[1] * keys.shape[2], keys.shape[2], length, d
    return groups, keys.shape[1], keys.shape[1], length, d


def _chunk_grads(w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
                 token_lr: Tensor, operand_dtype: torch.dtype, block_rows: Optional[int],
                 block_hidden: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """The operator's implementation: allocate and launch (checked arguments)."""
    check_runnable(keys, operand_dtype)
    per_image_chunks = keys.dim() == 5
    groups, chunks, per_image, length, d = _sizes(keys)

    def strides(t: Tensor) -> Tuple[int, ...]:
        """(group, image, chunk, rows...) strides; one image of C chunks for 4-D."""
        return t.stride() if per_image_chunks else (t.stride(0), 0, *t.stride()[1:])
    hidden = w1.shape[-1]
    opts = dict(device=keys.device, dtype=torch.float32)
    g1 = torch.empty(groups, chunks, d, hidden, **opts)
    g2 = torch.empty(groups, chunks, hidden, d, **opts)
    if groups * chunks == 0 or length == 0 or hidden == 0 or d == 0:
        return g1.zero_(), g2.zero_(), torch.zeros(groups, chunks, d, **opts)
    check_span('keys', length, keys)
    check_span('values', length, values)
    check_span('token_lr', length, token_lr, row_dim=-1)
    check_span('the gradient at the MLP output', length, keys.new_empty(0, d))
    arch = target_arch(keys.device)
    tiles = tile_config(d, length, block_rows, block_hidden, operand_dtype, arch=arch)
    kernels, cfg = launch_config(operand_dtype, keys.device)
    cfg.pop('BASE_PREC')
    w1, w2 = as_operands(w1, operand_dtype), as_operands(w2, operand_dtype)
    row_blocks, hidden_blocks = cdiv(length, tiles['BM']), cdiv(hidden, tiles['BH'])
    # pass 2 multiplies it in operand_dtype: stored so, it is read as is
    d_hidden = torch.empty(groups, chunks, length, d, device=keys.device, dtype=operand_dtype)
    d_g = torch.empty(groups * chunks, row_blocks, d, **opts)
    loss_scale = 2.0 / d
    kernels.grads_rows_kernel[(groups * chunks * row_blocks,)](
        keys, values, token_lr, w1, w2, g, d_hidden, d_g,
        chunks, per_image, length, d, hidden, row_blocks,
        *strides(keys), *strides(values), *strides(token_lr),
        *w1.stride(), *w2.stride(), *g.stride(),
        loss_scale, LN_EPS, **tiles, **cfg)
    kernels.grads_cols_kernel[(groups * chunks * hidden_blocks,)](
        keys, d_hidden, w1, w2, g1, g2,
        chunks, per_image, length, d, hidden, hidden_blocks,
        *strides(keys), *w1.stride(), *w2.stride(),
        loss_scale, **tile_config(d, length, block_rows, block_hidden, operand_dtype,
                                  columns=True, arch=arch), **cfg)
    return g1, g2, d_g.sum(dim=1).view(groups, chunks, d)


_chunk_grads_op = torch.library.custom_op('convneur_mm::memory_chunk_grads', _chunk_grads,
                                          mutates_args=())


@_chunk_grads_op.register_fake
def _chunk_grads_fake(w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
                      token_lr: Tensor, operand_dtype: torch.dtype, block_rows: Optional[int],
                      block_hidden: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    groups, chunks, _, _, d = _sizes(keys)
    hidden = w1.shape[-1]
    return (keys.new_empty(groups, chunks, d, hidden), keys.new_empty(groups, chunks, hidden, d),
            keys.new_empty(groups, chunks, d))
