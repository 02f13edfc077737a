"""Every chunk's write gradient as two Triton kernels (or, where chosen, one
program per chunk that runs both), a custom operator
``torch.ops.convneur_mm.memory_chunk_grads`` whose backward is two more
(``torch.ops.convneur_mm.memory_chunk_grads_backward``); in inference its two
passes also in two calls (``chunk_grads_triton_staged``)."""
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..common import LN_EPS, MemoryWeights, autograd_records, check_gelu_approximate
from ..kernels.launcher import launch_config, launch_kernel, multiprocessors, target_arch
from ..kernels.ops import (as_operands, call_kernel_op, check_arguments, check_runnable,
                           check_span, gelu_tanh, kernel_op, register_first_order_autograd)
from ..kernels.tiles import (TAIL_ROWS, cdiv, chosen_kernel, least_programs, row_parts,
                             tile_config)


def chunk_grads_triton(weights: MemoryWeights, keys: Tensor, values: Tensor, token_lr: Tensor,
                       operand_dtype: Optional[torch.dtype] = None, *,
                       block_rows: Optional[int] = None,
                       block_hidden: Optional[int] = None,
                       gelu_approximate: str = 'none',
                       grads_dtype: Optional[torch.dtype] = None) -> MemoryWeights:
    """``chunk_grads_torch`` as two kernels. Differentiable: its backward
    kernels recompute the chain (nothing but the inputs is saved; no double
    backward), as ``chunk_grads_closed_form`` derives it.

    Pass 1 runs per block of a chunk's rows: the MLP at the shared weights, its
    LayerNorm and the closed-form LayerNorm backward in registers, writing
    only the (tokens, d) gradient at the MLP's output (in ``operand_dtype``,
    which pass 2 multiplies it in) and per-block partial
    sums of d_g (and, with 16-bit operands, the keys in that dtype). Pass 2
    runs per (chunk, block of hidden units): it recomputes that block of
    ``keys @ w1`` and accumulates its slices of the chunk's G1 and G2 in
    float32 registers. No (tokens, 4d) tensor reaches memory, and keys,
    values and step sizes are read where they lie (any strides). Where
    ``tiles.chosen_kernel('grads_chunk', ...)`` (a tuned entry, or
    ``forced_tiles('grads_chunk')``), one program per chunk runs both passes
    instead, reading back its own pass-1 results (which L2 may keep); and for
    the backward ``'grads_backward_chunk'`` likewise.

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
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.
        grads_dtype: the dtype w1's and w2's gradients are written in: None
            or float32; or a 16-bit ``operand_dtype`` for a reader that only
            sums them into states (the scan kernel), at half their bytes.
            Their cotangents may come in either dtype. The memory trains on
            16-bit ones with bfloat16 only (``neural_memory._grads_dtype``).

    Returns:
        gradients of ``sum_i theta_i / d * ||f_W(k_i) - v_i||^2`` per chunk:
        (G, C, d, 4d), (G, C, 4d, d) in ``grads_dtype``, (G, C, d) float32.
    """
    w1, w2, g = weights
    operand_dtype, grads_dtype = _checked(weights, keys, values, token_lr, operand_dtype,
                                          block_rows, block_hidden, gelu_approximate,
                                          grads_dtype)
    return MemoryWeights(*call_kernel_op(_chunk_grads_op, _chunk_grads, w1, w2, g, keys, values,
                                         token_lr, operand_dtype, block_rows, block_hidden,
                                         gelu_approximate, grads_dtype))


def chunk_grads_triton_staged(weights: MemoryWeights, keys: Tensor, values: Tensor,
                              token_lr: Tensor, operand_dtype: Optional[torch.dtype] = None, *,
                              gelu_approximate: str = 'none',
                              grads_dtype: Optional[torch.dtype] = None
                              ) -> Callable[[], MemoryWeights]:
    """``chunk_grads_triton`` in inference, in two steps, so that the caller
    can free the keys, values and step sizes before w1's and w2's gradients,
    the largest results, are allocated. This call checks the arguments and
    runs the rows pass, which reads them; the callable it returns runs the
    weights' pass and returns the gradients (``chunk_grads_triton``'s, the
    same launches). With 16-bit operands the weights' pass reads the rows
    pass's copy of the keys; float32 keys it reads, and so keeps, where they
    lie. Outside autograd and graph capture by ``torch.compile`` only."""
    if autograd_records(*weights, keys, values, token_lr):
        raise RuntimeError('chunk_grads_triton_staged serves inference: train through '
                           'chunk_grads_triton')
    if torch.compiler.is_compiling():
        raise RuntimeError('chunk_grads_triton_staged calls no operator: under torch.compile '
                           'call chunk_grads_triton')
    operand_dtype, grads_dtype = _checked(weights, keys, values, token_lr, operand_dtype,
                                          None, None, gelu_approximate, grads_dtype)
    weights_pass = _staged(*weights, keys, values, token_lr, operand_dtype, None, None,
                           gelu_approximate, grads_dtype)
    return lambda: MemoryWeights(*weights_pass())


def _checked(weights: MemoryWeights, keys: Tensor, values: Tensor, token_lr: Tensor,
             operand_dtype: Optional[torch.dtype], block_rows: Optional[int],
             block_hidden: Optional[int], gelu_approximate: str,
             grads_dtype: Optional[torch.dtype]) -> Tuple[torch.dtype, torch.dtype]:
    """``chunk_grads_triton``'s checks of its arguments; the operand dtype and
    ``grads_dtype``, their defaults filled in."""
    w1, w2, g = weights
    operand_dtype = operand_dtype or torch.float32
    per_image_chunks = keys.dim() == 5
    lead = ('G', 'B', 'U') if per_image_chunks else ('G', 'C')
    check_arguments([('keys', keys, (*lead, 'L', 'd')), ('values', values, (*lead, 'L', 'd')),
                     ('token_lr', token_lr, (*lead, 'L')), ('weights.w1', w1, ('G', 'd', 'h')),
                     ('weights.w2', w2, ('G', 'h', 'd')), ('weights.g', g, ('G', 'd'))],
                    operand_dtype, (block_rows, block_hidden))
    check_gelu_approximate(gelu_approximate)
    grads_dtype = grads_dtype or torch.float32
    if grads_dtype not in (torch.float32, operand_dtype):
        raise ValueError(f'grads_dtype must be float32 or the operand dtype {operand_dtype}, '
                         f'got {grads_dtype}')
    return operand_dtype, grads_dtype


def _sizes(keys: Tensor) -> Tuple[int, int, int, int, int]:
    """(groups, chunks, chunks per image, rows L, width d) of 4-D or 5-D keys."""
    groups, length, d = keys.shape[0], keys.shape[-2], keys.shape[-1]
    if keys.dim() == 5:
        return groups, keys.shape[1] * keys.shape[2], keys.shape[2], length, d
    return groups, keys.shape[1], keys.shape[1], length, d


def _strides_of(keys: Tensor) -> Callable[[Tensor], Tuple[int, ...]]:
    """(group, image, chunk, rows...) strides of tensors laid out as ``keys``;
    one image of C chunks for 4-D keys."""
    if keys.dim() == 5:
        return lambda t: t.stride()
    return lambda t: (t.stride(0), 0, *t.stride()[1:])


def _check_spans(keys: Tensor, values: Tensor, token_lr: Tensor) -> None:
    """``check_span`` of every (rows, d) tensor the kernels address."""
    length, d = keys.shape[-2:]
    check_span('keys', length, keys)
    check_span('values', length, values)
    check_span('token_lr', length, token_lr, row_dim=-1)
    check_span('the gradient at the MLP output', length, keys.new_empty(0, d))


class _RowBlocks(NamedTuple):
    """How the rows pass walks the rows: ``flat``, blocks over each image's
    U L written rows (else over each chunk's L); ``blocks`` per image (per
    chunk); ``blocks_per_group``, the grid's share of one group; ``slots``,
    the most blocks that meet one chunk."""
    flat: bool
    blocks: int
    blocks_per_group: int
    slots: int


def _row_blocks(keys: Tensor, values: Tensor, token_lr: Tensor, block_rows: int) -> _RowBlocks:
    """Blocks over each image's rows where a block meets at most two chunks
    (``block_rows`` <= L) and an image's rows stay within the int32 tile
    offsets; else blocks over each chunk's rows, each chunk padded to whole
    blocks."""
    groups, chunks, per_image, length, d = _sizes(keys)
    images = chunks // per_image

    def span(t: Tensor, row_dim: int) -> int:  # an image's U chunks of L rows in t
        width = 0 if row_dim == -1 else d * abs(t.stride(-1))
        return (per_image * abs(t.stride(row_dim - 1)) + length * abs(t.stride(row_dim)) +
                width)

    spans = (span(keys, -2), span(values, -2), span(token_lr, -1), per_image * length * d)
    if block_rows <= length and max(spans) < 2**31:
        blocks = cdiv(per_image * length, block_rows)
        return _RowBlocks(True, blocks, images * blocks, cdiv(length, block_rows) + 1)
    blocks = cdiv(length, block_rows)
    return _RowBlocks(False, blocks, chunks * blocks, blocks)


def _keys_operand(keys: Tensor, operand_dtype: torch.dtype) -> Tensor:
    """Where the weights' pass reads the keys: with 16-bit operands a
    contiguous copy in ``operand_dtype`` that the rows pass writes (the
    weights' pass reads each chunk's keys once per hidden block: at half the
    bytes, and without converting a tile each time); else the keys themselves."""
    if operand_dtype == torch.float32:
        return keys
    return torch.empty(keys.shape, device=keys.device, dtype=operand_dtype)


def _launch_config(operand_dtype: torch.dtype, device: torch.device,
                   gelu_approximate: str) -> Tuple[object, dict]:
    """``launch_config`` without the decomposed read's constexpr, with GELU's."""
    kernels, cfg = launch_config('chunk_grads', operand_dtype, device)
    cfg.pop('BASE_PREC')
    return kernels, dict(cfg, GELU_TANH=gelu_tanh(gelu_approximate))


def _chunk_grads(w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
                 token_lr: Tensor, operand_dtype: torch.dtype, block_rows: Optional[int],
                 block_hidden: Optional[int], gelu_approximate: str = 'none',
                 grads_dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
    """The operator's implementation: both passes at once (``_staged``)."""
    return _staged(w1, w2, g, keys, values, token_lr, operand_dtype, block_rows,
                   block_hidden, gelu_approximate, grads_dtype)()


GradsPass = Callable[[], Tuple[Tensor, Tensor, Tensor]]


def _staged(w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
            token_lr: Tensor, operand_dtype: torch.dtype, block_rows: Optional[int],
            block_hidden: Optional[int], gelu_approximate: str = 'none',
            grads_dtype: torch.dtype = torch.float32) -> GradsPass:
    """Allocate and launch (checked arguments) the rows pass now, and return
    the weights' pass, which allocates w1's and w2's gradients (written in
    ``grads_dtype``) and reads the rows pass's results, not keys, values or
    step sizes (but float32 keys, its operands). The one-program-per-chunk
    kernel runs both passes now."""
    check_runnable(keys, operand_dtype)
    groups, chunks, per_image, length, d = _sizes(keys)
    strides = _strides_of(keys)
    hidden = w1.shape[-1]
    opts = dict(device=keys.device, dtype=torch.float32)
    shapes = _output_shapes(w1, keys)
    device = keys.device

    def new_grads() -> Tuple[Tensor, Tensor]:
        return tuple(torch.empty(shape, device=device, dtype=grads_dtype)
                     for shape in shapes[:2])

    if groups * chunks == 0 or length == 0 or hidden == 0 or d == 0:
        zeros = (*(t.zero_() for t in new_grads()), torch.zeros(groups, chunks, d, **opts))
        return lambda: zeros
    _check_spans(keys, values, token_lr)
    arch = target_arch(device)
    kernels, cfg = _launch_config(operand_dtype, device, gelu_approximate)
    w1, w2 = as_operands(w1, operand_dtype), as_operands(w2, operand_dtype)
    # pass 2 multiplies it in operand_dtype: stored so, it is read as is
    d_hidden = torch.empty(groups, chunks, length, d, device=device, dtype=operand_dtype)
    keys_op = _keys_operand(keys, operand_dtype)
    copy_keys = keys_op is not keys
    loss_scale = 2.0 / d
    # both passes, a program per chunk
    if chosen_kernel('grads_chunk', d, operand_dtype, arch, False, groups * chunks,
                     multiprocessors(device)):
        tiles = tile_config('grads_chunk', d, length, block_rows, block_hidden, operand_dtype,
                            arch=arch)
        g1, g2 = new_grads()
        d_g = torch.empty(groups * chunks, d, **opts)
        launch_kernel(
            kernels.grads_chunk_kernel, groups * chunks, tiles, device,
            keys, values, token_lr, w1, w2, g, d_hidden, d_g, keys_op, g1, g2,
            chunks, per_image, length, d, hidden,
            *strides(keys), *strides(values), *strides(token_lr), *strides(keys_op),
            *w1.stride(), *w2.stride(), *g.stride(),
            loss_scale, LN_EPS, **cfg, COPY_KEYS=copy_keys, TAIL=TAIL_ROWS)
        done = g1, g2, d_g.view(groups, chunks, d)
        return lambda: done
    tiles = tile_config('grads_rows', d, length, block_rows, block_hidden, operand_dtype,
                        arch=arch)
    # the weights' pass has tiles of its own: its grid counts its hidden blocks
    cols = tile_config('grads_cols', d, length, block_rows, block_hidden, operand_dtype,
                       arch=arch)
    hidden_blocks = cdiv(hidden, cols['BH'])
    rows = _row_blocks(keys, values, token_lr, tiles['BM'])
    # d_g's shares, one slot per block that meets a chunk; zeros where none does
    d_g_shares = torch.zeros(groups * chunks, rows.slots, d, **opts)
    launch_kernel(
        kernels.grads_rows_kernel, groups * rows.blocks_per_group, tiles, device,
        keys, values, token_lr, w1, w2, g, d_hidden, d_g_shares, keys_op,
        chunks, per_image, length, d, hidden, rows.blocks, rows.slots,
        *strides(keys), *strides(values), *strides(token_lr),
        *w1.stride(), *w2.stride(), *g.stride(),
        loss_scale, LN_EPS, **cfg, COPY_KEYS=copy_keys, FLAT=rows.flat)
    d_g = d_g_shares.sum(dim=1).view(groups, chunks, d)

    def weights_pass() -> Tuple[Tensor, Tensor, Tensor]:
        g1, g2 = new_grads()
        launch_kernel(
            kernels.grads_cols_kernel, groups * chunks * hidden_blocks, cols, device,
            keys_op, d_hidden, w1, w2, g1, g2,
            chunks, per_image, length, d, hidden, hidden_blocks,
            *strides(keys_op), *w1.stride(), *w2.stride(),
            loss_scale, **cfg, TAIL=TAIL_ROWS)
        return g1, g2, d_g

    return weights_pass


# the backward's columns pass sums up to this many chunks' shares of the weights'
# gradients in one program (in a fixed order) where the grid keeps its least
# programs (``tiles.least_programs``): fewer shares to write and sum
MAX_BACKWARD_COLS_CHUNKS = 16


def backward_cols_chunks(tiles: int, chunks: int, processors: int) -> int:
    """Chunks per program of the backward's columns pass, of ``tiles``
    (group, chunk, hidden block) tiles over ``chunks`` chunks per group:
    as many as keep ``tiles.least_programs``, at most
    ``MAX_BACKWARD_COLS_CHUNKS``, at least one."""
    return max(1, min(MAX_BACKWARD_COLS_CHUNKS, chunks, tiles // least_programs(processors)))


def _chunk_grads_backward(w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
                          token_lr: Tensor, bar_w1: Tensor, bar_w2: Tensor, bar_g: Tensor,
                          operand_dtype: torch.dtype, block_rows: Optional[int],
                          block_hidden: Optional[int], gelu_approximate: str = 'none'
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (w1, w2, g, keys, values, token_lr) from the
    cotangents of the three outputs (checked arguments; keys' gradient
    in keys' shape, contiguous)."""
    check_runnable(keys, operand_dtype)
    groups, chunks, per_image, length, d = _sizes(keys)
    strides = _strides_of(keys)
    hidden = w1.shape[-1]
    opts = dict(device=keys.device, dtype=torch.float32)
    grad_keys, grad_values = torch.empty(keys.shape, **opts), torch.empty(values.shape, **opts)
    grad_lr = torch.empty(token_lr.shape, **opts)
    if groups * chunks == 0 or length == 0 or hidden == 0 or d == 0:
        zeros = lambda t: torch.zeros(t.shape, **opts)  # noqa: E731
        return (zeros(w1), zeros(w2), zeros(g), grad_keys.zero_(), grad_values.zero_(),
                grad_lr.zero_())
    _check_spans(keys, values, token_lr)
    arch = target_arch(keys.device)
    kernels, cfg = _launch_config(operand_dtype, keys.device, gelu_approximate)
    w1_op, w2_op = as_operands(w1, operand_dtype), as_operands(w2, operand_dtype)
    # w1's and w2's cotangents are read as they come (16-bit where the gradients were):
    # the kernels take them as product operands
    bar_g = bar_g.float()
    # the weights' pass multiplies them in operand_dtype: stored so, read as is
    d_hidden = torch.empty(groups, chunks, length, d, device=keys.device, dtype=operand_dtype)
    bar_hidden = torch.empty_like(d_hidden)
    keys_op = _keys_operand(keys, operand_dtype)

    def weight_shares(blocks: int) -> Tuple[Tensor, Tensor]:
        """The weights' gradients' shares of ``blocks`` blocks of each group's
        chunks, summed in a fixed order: deterministic."""
        return (torch.empty(groups, blocks, d, hidden, **opts),
                torch.empty(groups, blocks, hidden, d, **opts))

    if chosen_kernel('grads_backward_chunk', d, operand_dtype, arch, False, groups * chunks,
                     multiprocessors(keys.device)):  # a program per chunk
        tiles = tile_config('grads_backward_chunk', d, length, block_rows, block_hidden,
                            operand_dtype, arch=arch)
        # a share of g's gradient per block of rows: whole blocks, then TAIL_ROWS at a time
        slots = sum(blocks for _, blocks, _ in row_parts(length, tiles))
        grad_scale = torch.empty(groups * chunks, slots, d, **opts)
        grad_w1, grad_w2 = weight_shares(chunks)
        launch_kernel(
            kernels.grads_backward_chunk_kernel, groups * chunks, tiles, keys.device,
            keys, values, token_lr, w1_op, w2_op, g, bar_w1, bar_w2, bar_g,
            grad_keys, grad_values, grad_lr, grad_scale, d_hidden, bar_hidden, keys_op,
            grad_w1, grad_w2, chunks, per_image, length, d, hidden, slots,
            *strides(keys), *strides(values), *strides(token_lr), *strides(keys_op),
            *w1_op.stride(), *w2_op.stride(), *g.stride(),
            *bar_w1.stride(), *bar_w2.stride(), *bar_g.stride(),
            LN_EPS, **cfg, COPY_KEYS=keys_op is not keys, TAIL=TAIL_ROWS)
        return (grad_w1.sum(dim=1), grad_w2.sum(dim=1), grad_scale.view(groups, -1, d).sum(1),
                grad_keys, grad_values, grad_lr)
    tiles = tile_config('grads_backward_rows', d, length, block_rows, block_hidden,
                        operand_dtype, arch=arch)
    row_blocks = cdiv(length, tiles['BM'])
    grad_scale = torch.empty(groups * chunks, row_blocks, d, **opts)
    launch_kernel(
        kernels.grads_backward_rows_kernel, groups * chunks * row_blocks, tiles, keys.device,
        keys, values, token_lr, w1_op, w2_op, g, bar_w1, bar_w2, bar_g,
        grad_keys, grad_values, grad_lr, grad_scale, d_hidden, bar_hidden, keys_op,
        chunks, per_image, length, d, hidden, row_blocks,
        *strides(keys), *strides(values), *strides(token_lr),
        *w1_op.stride(), *w2_op.stride(), *g.stride(),
        *bar_w1.stride(), *bar_w2.stride(), *bar_g.stride(),
        LN_EPS, **cfg, COPY_KEYS=keys_op is not keys)
    cols = tile_config('grads_backward_cols', d, length, block_rows, block_hidden,
                       operand_dtype, arch=arch)
    hidden_blocks = cdiv(hidden, cols['BH'])
    per_program = backward_cols_chunks(groups * chunks * hidden_blocks, chunks,
                                       multiprocessors(keys.device))
    chunk_blocks = cdiv(chunks, per_program)
    grad_w1, grad_w2 = weight_shares(chunk_blocks)
    launch_kernel(
        kernels.grads_backward_cols_kernel, groups * chunk_blocks * hidden_blocks, cols,
        keys.device, keys_op, d_hidden, bar_hidden, w1_op, w2_op, bar_w1, bar_w2, grad_w1,
        grad_w2, chunks, per_image, length, d, hidden, hidden_blocks, chunk_blocks, per_program,
        *strides(keys_op), *w1_op.stride(), *w2_op.stride(), *bar_w1.stride(),
        *bar_w2.stride(), **cfg, TAIL=TAIL_ROWS)
    return (grad_w1.sum(dim=1), grad_w2.sum(dim=1),
            grad_scale.view(groups, -1, d).sum(dim=1), grad_keys, grad_values, grad_lr)


_chunk_grads_op = kernel_op('memory_chunk_grads', _chunk_grads)
_chunk_grads_backward_op = kernel_op('memory_chunk_grads_backward', _chunk_grads_backward)


@_chunk_grads_op.register_fake
def _chunk_grads_fake(w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
                      token_lr: Tensor, operand_dtype: torch.dtype, block_rows: Optional[int],
                      block_hidden: Optional[int], gelu_approximate: str = 'none',
                      grads_dtype: torch.dtype = torch.float32
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    shapes = _output_shapes(w1, keys)
    return (*(keys.new_empty(shape, dtype=grads_dtype) for shape in shapes[:2]),
            keys.new_empty(shapes[2]))


@_chunk_grads_backward_op.register_fake
def _chunk_grads_backward_fake(w1: Tensor, w2: Tensor, g: Tensor, keys: Tensor, values: Tensor,
                               token_lr: Tensor, bar_w1: Tensor, bar_w2: Tensor, bar_g: Tensor,
                               operand_dtype: torch.dtype, block_rows: Optional[int],
                               block_hidden: Optional[int], gelu_approximate: str = 'none'
                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(keys.new_empty(t.shape) for t in (w1, w2, g, keys, values, token_lr))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs[:6])
    ctx.options = inputs[6:]


def _backward(ctx, bar_w1: Optional[Tensor], bar_w2: Optional[Tensor],
              bar_g: Optional[Tensor]) -> tuple:
    w1, w2, g, keys, values, token_lr = ctx.saved_tensors
    # an unused output's cotangent may come as None: its zeros
    bars = [torch.zeros(shape, device=keys.device) if bar is None else bar
            for bar, shape in zip((bar_w1, bar_w2, bar_g), _output_shapes(w1, keys))]
    # the options but grads_dtype: the cotangents come in the gradients' dtypes
    grads = call_kernel_op(_chunk_grads_backward_op, _chunk_grads_backward, w1, w2, g, keys,
                           values, token_lr, *bars, *ctx.options[:4])
    return (*grads, None, None, None, None, None)


def _output_shapes(w1: Tensor, keys: Tensor) -> Tuple[Tuple[int, ...], ...]:
    """The three outputs' shapes."""
    groups, chunks, _, _, d = _sizes(keys)
    hidden = w1.shape[-1]
    return (groups, chunks, d, hidden), (groups, chunks, hidden, d), (groups, chunks, d)


register_first_order_autograd(_chunk_grads_op, _backward, _setup_context)
