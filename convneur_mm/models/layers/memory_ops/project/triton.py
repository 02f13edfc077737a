"""The projections as one Triton kernel, a custom operator
``torch.ops.convneur_mm.memory_project`` whose backward is one more
(``torch.ops.convneur_mm.memory_project_backward``) and one product for the
weight's gradient."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common import RMS_EPS, autograd_records, product
from ..kernels.availability import MAX_HEAD_DIM
from ..kernels.launcher import launch_config, multiprocessors, target_arch
from ..kernels.ops import (as_operands, call_kernel_op, check_arguments, check_runnable,
                           check_span, kernel_op, register_first_order_autograd,
                           weight_arguments)
from ..kernels.tiles import (block_width, cdiv, check_tiles, column_blocks, forced_options,
                             least_programs, next_pow2, tuned_tiles)
from .weights import (FoldedProjections, Projected, ProjectionWeights,
                      check_projection_arguments, check_projection_shapes, fold)


# a program holds whole rows of x and of each head (register tiles): as the
# other kernels, widths up to 256
MAX_PROJECTION_WIDTH = MAX_HEAD_DIM
# features per program of the row groups' merge: a whole row up to 256
POOL_MERGE_FEATURES = 256
# the backward holds whole weight tiles (no feature steps) of at most 128 columns
# per column block (a 16-bit (128, 128) tile is 32 KiB of shared memory); wider rows
# only where their split compiled with bounded spills: M4's 160 as 128 + 32
# (docs/notes/benchmarks.md#two-column-blocks-at-m4s-width-machine-i)
MAX_PROJECTION_BACKWARD_BLOCK = 128
PROJECTION_BACKWARD_SPLIT_WIDTHS = (160, )
# output features per product of the backward's values, pool logits and split heads
# (``project_backward_kernel``'s BO): the block at which M3's and M4's training steps
# compile without spills for sm_80 and sm_90, where whole rows spilled
# (docs/notes/benchmarks.md#the-projections-backward-in-blocks-of-output-features-machine-k)
PROJECTION_BACKWARD_OUTPUT_BLOCK = 32
# rows held in two column blocks by default (16-bit operands): {(BD, BE): (BM, BK)}
# of the forward at 8 warps, sm_80 and sm_90 alike: the largest tiles that compile
# without spills as a bf16 M4 stage launches them (the alternatives' spills:
# docs/notes/benchmarks.md#two-column-blocks-at-m4s-width-machine-i)
PROJECTION_SPLIT = {(128, 32): (32, 32)}
# exact queries' (BM at most, QBK): rows, and the float32 queries' features per step, by
# whether a row is in two column blocks; the largest rows that compile without spills for
# sm_80 and sm_90 at C_m 128 and 160 (32 rows at 32 features spilled 32 to 300 B; M4's
# at 16 features 28 B on sm_80)
# (docs/notes/benchmarks.md#a-decomposed-reads-projections-exact-queries-machine-k)
EXACT_QUERY_TILES = {False: (32, 16), True: (16, 32)}


def projection_row_groups(programs: int, row_blocks: int, processors: int) -> Tuple[int, int]:
    """(groups, row blocks per group) of each (image, chunk)'s ``row_blocks``
    where ``programs`` (image, chunk) pairs run on ``processors``
    multiprocessors: as many groups as keep ``tiles.least_programs`` (a
    chunk's rows go to several programs where the images' chunks are too
    few: COCO's chunks of 4096 at 2 images gave 34), each of whole row
    blocks, no group empty."""
    wanted = min(row_blocks, max(1, cdiv(least_programs(processors), programs)))
    per_group = cdiv(row_blocks, wanted)
    return cdiv(row_blocks, per_group), per_group


def _row_grid(x: Tensor, chunk_size: int, block_rows: int) -> Tuple[int, int, int]:
    """A projection kernel's (image, chunk) pairs of ``x`` (B, N, d) in
    chunks of ``chunk_size``, their row groups (``projection_row_groups``,
    blocks of ``block_rows``) and the rows of a group."""
    b, n, _ = x.shape
    programs = b * cdiv(n, chunk_size)
    groups, per_group = projection_row_groups(programs, cdiv(min(chunk_size, n), block_rows),
                                              multiprocessors(x.device))
    return programs, groups, per_group * block_rows


def _takes_exact_queries(exact_queries: bool, operand_dtype: torch.dtype) -> bool:
    """Whether the forward's queries take float32 operands beside the
    others': asked for, and the others 16-bit (float32 ones are exact)."""
    return exact_queries and operand_dtype != torch.float32


def projection_backward_serves(d: int) -> bool:
    """Whether ``project_triton``'s backward kernel takes rows of ``d``
    columns: up to ``MAX_PROJECTION_BACKWARD_BLOCK``, and
    ``PROJECTION_BACKWARD_SPLIT_WIDTHS``."""
    return d <= MAX_PROJECTION_BACKWARD_BLOCK or d in PROJECTION_BACKWARD_SPLIT_WIDTHS


def project_triton(x: Tensor, weights: ProjectionWeights, num_updates: int, chunk_size: int,
                   max_lr: float, operand_dtype: Optional[torch.dtype] = None, *,
                   exact_queries: bool = False, block_rows: Optional[int] = None,
                   block_features: Optional[int] = None) -> Projected:
    """``project_torch`` as one kernel over each (image, chunk): the RMSNorm, every
    projection's product, the queries' and keys' per-head RMSNorms, the step
    sizes' sigmoid and the pool's softmax over each written chunk, so that x
    is read once and nothing but the results is written (no (B, N, 4d + H)
    product, no cast of x). The folded weight is cast to ``operand_dtype``
    once per call; in inference one launch folds it in that dtype
    (``fold_triton``; exact queries: in float32, then cast). Differentiable
    at the widths ``projection_backward_serves``: its backward kernel
    recomputes the products (only x, the weights and the pool's (B, U, d)
    statistics are saved) and writes x's gradient and the product's, whose
    one product with x gives the weight's.

    Args:
        x: (B, N, d) float32, any strides.
        weights: the layers' parameters, float32.
        num_updates, chunk_size, max_lr: as ``project_torch``'s.
        operand_dtype: the products' operand dtype (float32, float16,
            bfloat16; None: float32); the norms, gains, sigmoid and softmax
            stay float32.
        exact_queries: the queries' product at float32 accuracy (on GPUs
            with TF32 three TF32 products, ``tf32x3``, on tensor cores), the
            others in ``operand_dtype``: a decomposed read's W_0 part reads
            the queries at full accuracy. The backward's products take
            ``operand_dtype`` whatever this says, the queries' recomputed one
            too (the gradients of a 16-bit forward, the accuracy of any
            16-bit training; float32 ones spilled kilobytes per thread).
        block_rows: rows per tile (a power of two >= 16), for tests and tuning.
        block_features: features per product step (a power of two >= 16;
            None: ``projection_tiles``'), for tests and tuning.

    Returns:
        ``Projected``, float32: queries in a (B, N, H, hd) tensor, keys,
        values and step sizes in (B, T, ...) tensors, each as an (H, B, ...)
        view, as the projections' product lays them out.
    """
    check_projection_arguments(x, weights, num_updates, chunk_size)
    if x.shape[-1] > MAX_PROJECTION_WIDTH:
        raise ValueError(f'project_triton takes widths up to {MAX_PROJECTION_WIDTH}, got '
                         f'{x.shape[-1]}: use project_torch')
    operand_dtype = operand_dtype or torch.float32
    check_arguments([('x', x, ('B', 'N', 'd'))] + weight_arguments(weights), operand_dtype,
                    (block_rows, block_features), tile_names=('block_rows', 'block_features'))
    if not projection_backward_serves(x.shape[-1]) and autograd_records(x, *weights):
        raise ValueError(f'project_triton differentiates widths up to '
                         f'{MAX_PROJECTION_BACKWARD_BLOCK} and '
                         f'{PROJECTION_BACKWARD_SPLIT_WIDTHS}, got {x.shape[-1]}: train with '
                         'project_torch')
    # in inference one launch folds the weights, in the operand dtype where no float32
    # queries read them (seven ops and a cast in PyTorch); training differentiates ``fold``
    exact = _takes_exact_queries(exact_queries, operand_dtype)
    folded = (fold(weights) if autograd_records(x, *weights) else
              _fold_launched(weights, torch.float32 if exact else operand_dtype))
    *projected, pooled, _ = call_kernel_op(
        _project_op, _project, x, folded.weight, folded.bias, folded.gamma, num_updates,
        chunk_size, float(max_lr), operand_dtype, exact_queries, block_rows, block_features)
    # the store norm's weight applies after the pool's sum: one (B, U, d) product
    return Projected(*projected, pooled * weights.store_norm)


def fold_triton(weights: ProjectionWeights, dtype: torch.dtype = torch.float32
                ) -> FoldedProjections:
    """``fold`` in one launch, the weight written in ``dtype`` (float32 or
    the products' 16-bit operand dtype: the cast the projections would
    make), the bias and gains in float32. Not differentiable: inference's
    fold, where seven small ops and a cast took eight launches.

    Args:
        weights: the parameters, float32, on one device.
        dtype: the folded weight's dtype.
    """
    if autograd_records(*weights):
        raise ValueError('fold_triton has no backward: differentiate fold')
    check_projection_shapes(weights, weights.queries.shape[-1])
    check_arguments(weight_arguments(weights), torch.float32, (None, None))
    return _fold_launched(weights, dtype)


def _fold_launched(weights: ProjectionWeights, dtype: torch.dtype) -> FoldedProjections:
    """``fold_triton`` of checked weights (``project_triton`` has checked them)."""
    return FoldedProjections(*call_kernel_op(_fold_op, _fold, *weights, dtype))


def _fold_shapes(queries: Tensor, token_lr: Tensor, query_gamma: Tensor
                 ) -> Tuple[Tuple[int, ...], ...]:
    d, heads = queries.shape[0], token_lr.shape[0]
    return (4 * d + heads, d), (d + heads, ), (2 * heads, query_gamma.shape[1])


def _fold(retrieve_norm: Tensor, store_norm: Tensor, queries: Tensor, keys: Tensor,
          values: Tensor, logits: Tensor, logits_bias: Tensor, token_lr: Tensor,
          token_lr_bias: Tensor, query_gamma: Tensor, key_gamma: Tensor, dtype: torch.dtype
          ) -> Tuple[Tensor, Tensor, Tensor]:
    """The operator's implementation: allocate and launch, a program per row
    of the folded weight."""
    check_runnable(queries, dtype)
    w_shape, b_shape, g_shape = _fold_shapes(queries, token_lr, query_gamma)
    weight = queries.new_empty(w_shape, dtype=dtype)
    bias, gamma = queries.new_empty(b_shape), queries.new_empty(g_shape)
    d, heads, hd = queries.shape[0], token_lr.shape[0], query_gamma.shape[1]
    if weight.numel():
        kernels, _ = launch_config('project', dtype, queries.device)
        kernels.fold_kernel[(w_shape[0], )](
            retrieve_norm, store_norm, queries, keys, values, logits, logits_bias, token_lr,
            token_lr_bias, query_gamma, key_gamma, weight, bias, gamma, d, heads, hd,
            retrieve_norm.stride(0), store_norm.stride(0), *queries.stride(), *keys.stride(),
            *values.stride(), *logits.stride(), logits_bias.stride(0), *token_lr.stride(),
            token_lr_bias.stride(0), *query_gamma.stride(), *key_gamma.stride(),
            *weight.stride(), BD=next_pow2(d), BHD=next_pow2(hd), num_warps=2)
    return weight, bias, gamma


def projection_tiles(d: int, heads: int, rows: int, block_rows: Optional[int],
                     block_features: Optional[int], operand_dtype: torch.dtype,
                     backward: bool = False, arch: Optional[int] = None,
                     exact_queries: bool = False) -> dict:
    """The projection kernel's tiles: rows of x in the column blocks BD and
    BE (``tiles.column_blocks``; BE 0: one block), one head's columns in
    BHD and BHE, the step sizes' H columns (BH), BM rows, and BK features
    per product step (BK == BD: whole rows, one product per column block).

    16-bit operands up to 128 columns: whole rows at 32 rows and 8 warps,
    which compile without spills for sm_80 and sm_90 at C_m 128 (64 rows or
    4 warps spill). Rows of ``PROJECTION_SPLIT``'s widths (M4's 160 as
    128 + 32, not padded to 256) take that table's tiles. Other wider rows
    (a (256, 256) weight tile would need about 300 KiB of shared memory) and
    float32 operands (whose whole rows spill) take 16 rows and 32 features
    per step, which spill nothing at 128. The forward's queries take QBK
    features per step: BK, or with ``exact_queries`` (float32 queries
    beside 16-bit others) ``EXACT_QUERY_TILES``' (at most those rows).
    ``tiles.forced_tiles('project', split=0 or 1)`` decides the split
    instead (split at ``PROJECTION_SPLIT``'s widths, float32 too takes its
    tiles). The backward (``backward``) takes 16 rows, 8 warps, one stage
    and ``PROJECTION_BACKWARD_OUTPUT_BLOCK`` output features per product
    (BO; 0: whole rows), the tiles that compile without spills with 16-bit
    operands. The figures of these compiles:
    docs/notes/benchmarks.md#the-projection-and-scan-kernels-machine-h and
    #two-column-blocks-at-m4s-width-machine-i. It holds at most
    ``MAX_PROJECTION_BACKWARD_BLOCK`` columns per block, so wider rows
    always split (M4's 160 as 128 + 32; ``forced_tiles('project_backward',
    split=1)`` splits narrower ones). A ``tuned.TUNED_TILES`` entry of the
    kernel ('project' or 'project_backward') for the GPU of compute
    capability ``arch`` sets BM, num_warps, num_stages, the split and the
    backward's BO in place of these defaults (not for exact queries, which
    no entry was timed with); ``tiles.forced_tiles`` sets them in place of
    both; a caller's ``block_rows`` comes first."""
    check_tiles(block_rows, block_features, ('block_rows', 'block_features'))
    kernel = 'project_backward' if backward else 'project'
    exact = not backward and _takes_exact_queries(exact_queries, operand_dtype)
    # exact queries look up the decomposed kind, which the projections have no entries of
    tuned = {} if arch is None else tuned_tiles(kernel, arch, operand_dtype, block_width(d),
                                                exact) or {}
    forced = forced_options(kernel)
    launch = {**tuned, **forced}
    blocks = column_blocks(d)
    split_tiles = None if backward else PROJECTION_SPLIT.get(blocks)
    chosen_split = forced.get('split', tuned.get('split'))
    if backward:
        wide = block_width(d) > MAX_PROJECTION_BACKWARD_BLOCK
        split = wide if chosen_split is None else bool(chosen_split) and blocks[1] > 0
        if wide and not (split and blocks[0] <= MAX_PROJECTION_BACKWARD_BLOCK):
            raise ValueError(f'the projections\' backward holds rows of at most '
                             f'{MAX_PROJECTION_BACKWARD_BLOCK} columns per block: {d} columns '
                             f'in blocks of {blocks}')
    else:
        split = (split_tiles is not None and operand_dtype != torch.float32
                 if chosen_split is None else bool(chosen_split) and blocks[1] > 0)
    bd, be = blocks if split else (block_width(d), 0)
    bhd, bhe = column_blocks(d // heads) if split else (block_width(d // heads), 0)
    whole_rows = backward or bd + be <= 128 and operand_dtype != torch.float32
    bm, bk = (32 if whole_rows else 16), (bd if whole_rows else 32)
    if backward:
        bm = 16
    elif split and split_tiles is not None:
        bm, bk = split_tiles
    query_steps = bk
    if exact:
        rows, query_steps = EXACT_QUERY_TILES[bool(be)]
        bm = min(bm, rows)
    bm = launch.get('BM', bm)
    tiles = dict(BM=block_rows or min(bm, block_width(rows)), BD=bd, BE=be,
                 BK=min(block_features or bk, bd), BHD=bhd, BHE=bhe, BH=block_width(heads),
                 num_warps=launch.get('num_warps', 8),
                 num_stages=launch.get('num_stages', 1 if backward else 2))
    if backward:  # no block past the row's width
        tiles['BO'] = min(launch.get('BO', PROJECTION_BACKWARD_OUTPUT_BLOCK), block_width(d))
    else:
        tiles['QBK'] = min(block_features or query_steps, bd) if exact else tiles['BK']
    return tiles


def _outputs(x: Tensor, heads: int, updates: int, chunk_size: int) -> Tuple[Tensor, ...]:
    """The results' storage: queries (B, N, H, hd), keys (B, T, H, hd), values
    (B, T, d), step sizes (B, T, H), the pooled rows and the pool's
    log-sum-exp (B, U, d) (its fake's too)."""
    b, n, d = x.shape
    tokens = updates * chunk_size
    new = lambda *shape: x.new_empty(*shape, dtype=torch.float32)  # noqa: E731
    return new(b, n, heads, d // heads), new(b, tokens, heads, d // heads), new(b, tokens, d), \
        new(b, tokens, heads), new(b, updates, d), new(b, updates, d)


def _as_heads(queries: Tensor, keys: Tensor, values: Tensor, token_lr: Tensor
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    heads = queries.shape[2]
    return (queries.permute(2, 0, 1, 3), keys.permute(2, 0, 1, 3),
            values.unflatten(-1, (heads, -1)).permute(2, 0, 1, 3), token_lr.permute(2, 0, 1))


ProjectResults = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _project(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, num_updates: int,
             chunk_size: int, max_lr: float, operand_dtype: torch.dtype, exact_queries: bool,
             block_rows: Optional[int], block_features: Optional[int]) -> ProjectResults:
    """The operator's implementation: allocate and launch (checked arguments).
    Returns the heads-leading queries, keys, values and step sizes, the
    pooled rows (before the store norm's weight) and the pool's log-sum-exp."""
    check_runnable(x, operand_dtype)
    outputs = _outputs(x, gamma.shape[0] // 2, num_updates, chunk_size)
    if x.numel():
        launch_project(x, weight, bias, gamma, outputs, num_updates, chunk_size, max_lr,
                       operand_dtype, block_rows, block_features, exact_queries)
    queries, keys, values, token_lr, pooled, lse = outputs
    return (*_as_heads(queries, keys, values, token_lr), pooled, lse)


def launch_project(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor,
                   outputs: Tuple[Tensor, ...], num_updates: int, chunk_size: int, max_lr: float,
                   operand_dtype: torch.dtype, block_rows: Optional[int],
                   block_features: Optional[int], exact_queries: bool = False) -> None:
    """Launch the projection kernel, ``projection_row_groups`` programs per
    (image, chunk) of ``x`` (B, N, d), writing ``outputs`` in ``_outputs``'
    layouts: the queries, keys, values, step sizes, pooled rows and the
    pool's log-sum-exp (with several groups, each group's pooled rows and
    log-sum-exp merged by their log-sum-exps)."""
    queries, keys, values, token_lr, pooled, lse = outputs
    b, n, d = x.shape
    heads, hd = gamma.shape[0] // 2, gamma.shape[1]
    L = chunk_size
    _check_spans(L, x=x, queries=queries, keys=keys, values=values, token_lr=token_lr)
    tiles = projection_tiles(d, heads, min(L, n), block_rows, block_features, operand_dtype,
                             arch=target_arch(x.device), exact_queries=exact_queries)
    kernels, cfg = launch_config('project', operand_dtype, x.device)
    exact = _takes_exact_queries(exact_queries, operand_dtype)
    operands = as_operands(weight, operand_dtype)
    # exact queries: float32 operands at the decomposed read's W_0 precision, the
    # weight in both dtypes read at one set of strides
    query_cfg = launch_config('project', torch.float32, x.device)[1] if exact else cfg
    query_weight, weight = ((weight.contiguous(), operands.contiguous()) if exact
                            else (operands, operands))
    programs, groups, group_rows = _row_grid(x, L, tiles['BM'])
    # each group's pooled rows and log-sum-exp, merged below where the rows are split
    pool_out, lse_out = (pooled[:, :, None], lse[:, :, None]) if groups == 1 else (
        pooled.new_empty(b, num_updates, groups, d) for _ in range(2))
    kernels.project_kernel[(programs * groups,)](
        x, weight, query_weight, bias, gamma, queries, keys, values, token_lr, pool_out, lse_out,
        n, L, cdiv(n, L), num_updates, d, heads, hd, max_lr, RMS_EPS, groups,
        group_rows, *x.stride(), *weight.stride(), *gamma.stride(),
        *queries.stride(), *keys.stride(), *values.stride(), *token_lr.stride(),
        *pool_out.stride(), DTYPE=cfg['DTYPE'], PREC=cfg['PREC'],
        QDTYPE=query_cfg['DTYPE'], QPREC=query_cfg['BASE_PREC' if exact else 'PREC'],
        **tiles)
    if groups > 1 and num_updates:  # one launch where logsumexp, exp and sum took five
        merge_width = min(next_pow2(d), POOL_MERGE_FEATURES)
        kernels.pool_merge_kernel[(b * num_updates, cdiv(d, merge_width))](
            pool_out, lse_out, pooled, lse, groups, d, BD=merge_width)


def _check_spans(chunk_size: int, **tensors: Tensor) -> None:
    """``check_span`` of the (rows, ...) tensors a program addresses."""
    for name, t in tensors.items():
        check_span(name, min(chunk_size, t.shape[1]) or 1, t, row_dim=1)


def _project_backward(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, pooled: Tensor,
                      lse: Tensor, bar_queries: Tensor, bar_keys: Tensor, bar_values: Tensor,
                      bar_token_lr: Tensor, bar_pooled: Tensor, num_updates: int,
                      chunk_size: int, max_lr: float, operand_dtype: torch.dtype,
                      block_rows: Optional[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (x, weight, bias, gamma) from the cotangents of the
    operator's results (heads leading, as it returns them). The kernel writes
    x's and the product's; the weight's is the product's times x, one GEMM
    per part (every row's queries, the written rows' other columns); the
    gains' and biases' are per-block partial sums, summed here in a fixed
    order (deterministic)."""
    check_runnable(x, operand_dtype)
    b, n, d = x.shape
    heads, hd = gamma.shape[0] // 2, gamma.shape[1]
    L, tokens = chunk_size, num_updates * chunk_size
    outs = weight.shape[0]
    grad_x = torch.empty(b, n, d, device=x.device, dtype=torch.float32)
    # the product's gradient times rstd, (B, N, 4d + H): the weight GEMMs' operand,
    # its rows 16-byte aligned for the tensor cores (4d + H is odd for one head)
    grad_proj = x.new_empty(b, n, cdiv(outs, 8) * 8, dtype=operand_dtype)[..., :outs]
    tiles = projection_tiles(d, heads, min(L, n), block_rows, None, operand_dtype,
                             backward=True, arch=target_arch(x.device))
    row_blocks = cdiv(L, tiles['BM'])
    blocks = b * cdiv(n, L) * row_blocks
    grad_gamma = torch.zeros(blocks, 2 * heads, hd, device=x.device, dtype=torch.float32)
    grad_bias = torch.zeros(blocks, d + heads, device=x.device, dtype=torch.float32)
    if x.numel():
        # the cotangents in the forward's storage layout (views, any strides)
        bar_q, bar_k = bar_queries.permute(1, 2, 0, 3), bar_keys.permute(1, 2, 0, 3)
        bar_v, bar_lr = bar_values.permute(1, 2, 0, 3), bar_token_lr.permute(1, 2, 0)
        _check_spans(L, x=x, bar_queries=bar_q, bar_keys=bar_k, bar_values=bar_v,
                     bar_token_lr=bar_lr, grad_x=grad_x, grad_proj=grad_proj)
        launch_project_backward(x, weight, bias, gamma, pooled, lse,
                                (bar_q, bar_k, bar_v, bar_lr, bar_pooled),
                                (grad_x, grad_proj, grad_gamma, grad_bias), num_updates,
                                chunk_size, max_lr, operand_dtype, tiles)
    x_op = x.to(operand_dtype)  # one cast for both GEMMs
    grad_weight = torch.cat([_rows_product(grad_proj[..., :d], x_op),
                             _rows_product(grad_proj[:, :tokens, d:], x_op[:, :tokens])])
    return grad_x, grad_weight, grad_bias.sum(0), grad_gamma.sum(0)


def launch_project_backward(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor,
                            pooled: Tensor, lse: Tensor, cotangents: Tuple[Tensor, ...],
                            grads: Tuple[Tensor, ...], num_updates: int, chunk_size: int,
                            max_lr: float, operand_dtype: torch.dtype, tiles: dict) -> None:
    """Launch the projections' backward kernel, ``projection_row_groups``
    programs per (image, chunk) at the backward's ``tiles``
    (``projection_tiles(..., backward=True)``).

    Args:
        cotangents: those of the queries, keys, values, step sizes (in the
            forward's storage layout) and pooled rows.
        grads: written: x's, the product's times rstd, and the per-block
            shares of the gains' and the biases' gradients.
    """
    bar_q, bar_k, bar_v, bar_lr, bar_pooled = cotangents
    grad_x, grad_proj, grad_gamma, grad_bias = grads
    b, n, d = x.shape
    heads, hd = gamma.shape[0] // 2, gamma.shape[1]
    L = chunk_size
    kernels, cfg = launch_config('project', operand_dtype, x.device)
    tiles = {key: value for key, value in tiles.items() if key != 'BK'}
    w = as_operands(weight, operand_dtype)
    programs, groups, group_rows = _row_grid(x, L, tiles['BM'])
    kernels.project_backward_kernel[(programs * groups,)](
        x, w, bias, gamma, pooled, lse, bar_q, bar_k, bar_v, bar_lr, bar_pooled,
        grad_x, grad_proj, grad_gamma, grad_bias,
        n, L, cdiv(n, L), num_updates, d, heads, hd, max_lr, RMS_EPS, cdiv(L, tiles['BM']),
        groups, group_rows,
        *x.stride(), *w.stride(), *gamma.stride(), *pooled.stride(),
        *bar_q.stride(), *bar_k.stride(), *bar_v.stride(), *bar_lr.stride(),
        *bar_pooled.stride(), *grad_x.stride(), *grad_proj.stride(),
        DTYPE=cfg['DTYPE'], PREC=cfg['PREC'], **tiles)


def _rows_product(grad: Tensor, x: Tensor) -> Tensor:
    """sum over images of grad^T x: (B, M, O), (B, M, d) in the operand dtype
    -> (O, d) float32 (``product``: a float32 output on CUDA)."""
    return product(grad.transpose(1, 2), x, grad.dtype, torch.float32).sum(0)


_project_op = kernel_op('memory_project', _project)
_project_backward_op = kernel_op('memory_project_backward', _project_backward)


@_project_op.register_fake
def _project_fake(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, num_updates: int,
                  chunk_size: int, max_lr: float, operand_dtype: torch.dtype,
                  exact_queries: bool, block_rows: Optional[int],
                  block_features: Optional[int]) -> ProjectResults:
    outputs = _outputs(x, gamma.shape[0] // 2, num_updates, chunk_size)
    return (*_as_heads(*outputs[:4]), *outputs[4:])


@_project_backward_op.register_fake
def _project_backward_fake(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor,
                           pooled: Tensor, lse: Tensor, bar_queries: Tensor, bar_keys: Tensor,
                           bar_values: Tensor, bar_token_lr: Tensor, bar_pooled: Tensor,
                           num_updates: int, chunk_size: int, max_lr: float,
                           operand_dtype: torch.dtype, block_rows: Optional[int]
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    new = lambda t: t.new_empty(t.shape, dtype=torch.float32)  # noqa: E731
    return new(x), new(weight), new(bias), new(gamma)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, bias, gamma, *options = inputs
    # num_updates, chunk_size, max_lr, operand_dtype, exact_queries, block_rows, -
    ctx.options = options
    ctx.save_for_backward(x, weight, bias, gamma, output[4], output[5])


def _backward(ctx, *cotangents: Optional[Tensor]) -> tuple:
    x, weight, bias, gamma, pooled, lse = ctx.saved_tensors
    num_updates, chunk_size, max_lr, operand_dtype, _, block_rows, _ = ctx.options
    heads, hd = gamma.shape[0] // 2, gamma.shape[1]
    b, n, d = x.shape
    tokens = num_updates * chunk_size
    shapes = ((heads, b, n, hd), (heads, b, tokens, hd), (heads, b, tokens, hd),
              (heads, b, tokens), (b, num_updates, d))
    # an unused result's cotangent is None: zeros of its shape
    bars = [x.new_zeros(shape, dtype=torch.float32) if bar is None else bar
            for bar, shape in zip(cotangents[:5], shapes)]
    grads = call_kernel_op(_project_backward_op, _project_backward, x, weight, bias, gamma,
                           pooled, lse, *bars, num_updates, chunk_size, max_lr, operand_dtype,
                           block_rows)
    return (*grads, None, None, None, None, None, None, None)


register_first_order_autograd(_project_op, _backward, _setup_context)


_fold_op = kernel_op('memory_fold', _fold)


@_fold_op.register_fake
def _fold_fake(retrieve_norm: Tensor, store_norm: Tensor, queries: Tensor, keys: Tensor,
               values: Tensor, logits: Tensor, logits_bias: Tensor, token_lr: Tensor,
               token_lr_bias: Tensor, query_gamma: Tensor, key_gamma: Tensor,
               dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    w_shape, b_shape, g_shape = _fold_shapes(queries, token_lr, query_gamma)
    return (queries.new_empty(w_shape, dtype=dtype), queries.new_empty(b_shape),
            queries.new_empty(g_shape))
