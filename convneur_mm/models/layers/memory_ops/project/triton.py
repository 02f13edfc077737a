"""The projections as one Triton kernel, a custom operator
``torch.ops.convneur_mm.memory_project`` (inference: it has no backward, and
training projects in PyTorch)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common import RMS_EPS
from ..kernels.availability import MAX_HEAD_DIM
from ..kernels.launch import (_next_pow2, as_operands, call_kernel_op, cdiv, check_arguments,
                              check_runnable, check_span, check_tiles, launch_config)
from .weights import Projected, ProjectionWeights, check_projection_arguments, fold


# a program holds whole rows of x and of each head (register tiles): as the
# other kernels, widths up to 256
MAX_PROJECTION_WIDTH = MAX_HEAD_DIM


def project_triton(x: Tensor, weights: ProjectionWeights, num_updates: int, chunk_size: int,
                   max_lr: float, operand_dtype: Optional[torch.dtype] = None, *,
                   block_rows: Optional[int] = None,
                   block_features: Optional[int] = None) -> Projected:
    """``project_torch`` as one kernel per (image, chunk): the RMSNorm, every
    projection's product, the queries' and keys' per-head RMSNorms, the step
    sizes' sigmoid and the pool's softmax over each written chunk, so that x
    is read once and nothing but the results is written (no (B, N, 4d + H)
    product, no cast of x). The folded weight is cast to ``operand_dtype``
    once per call. Inference only: autograd through it is an error.

    Args:
        x: (B, N, d) float32, any strides.
        weights: the layers' parameters, float32.
        num_updates, chunk_size, max_lr: as ``project_torch``'s.
        operand_dtype: the products' operand dtype (float32, float16,
            bfloat16; None: float32); the norms, gains, sigmoid and softmax
            stay float32.
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
    check_arguments([('x', x, ('B', 'N', 'd'))] +
                    [(f'weights.{name}', t, tuple(f'{name}{i}' for i in range(t.dim())))
                     for name, t in weights._asdict().items()], operand_dtype,
                    (block_rows, block_features), tile_names=('block_rows', 'block_features'))
    if torch.is_grad_enabled() and (x.requires_grad or
                                    any(t.requires_grad for t in weights)):
        raise RuntimeError('project_triton has no backward (the Triton projections serve '
                           'inference): train with project_torch')
    folded = fold(weights)
    return Projected(*call_kernel_op(
        _project_op, _project, x, as_operands(folded.weight, operand_dtype), folded.bias,
        folded.gamma, weights.store_norm, num_updates, chunk_size, float(max_lr), operand_dtype,
        block_rows, block_features))


def projection_tiles(d: int, heads: int, rows: int, block_rows: Optional[int],
                     block_features: Optional[int], operand_dtype: torch.dtype) -> dict:
    """The projection kernel's tiles: whole rows of x (BD) and of one head
    (BHD), the step sizes' H columns (BH), BM rows, and BK features per
    product step. 16-bit operands up to 128 columns: one product per output
    (BK = BD) at 32 rows and 8 warps, which compile without spills for
    sm_80 and sm_90 at C_m 128 (64 rows spill 164 B, 4 warps 460 B). Wider
    rows (M4's 160, padded to 256; a (256, 256) weight tile would need about
    300 KiB of shared memory) and float32 operands (whole rows spill 10 KB)
    take 16 rows and 32 features per step: no spills at 128 (float32) and
    160 (16-bit); float32 at 160 spills 20 to 88 B. Not tuned by timing."""
    check_tiles(block_rows, block_features, ('block_rows', 'block_features'))
    bd = max(16, _next_pow2(d))
    whole_rows = bd <= 128 and operand_dtype != torch.float32
    return dict(BM=block_rows or min(32 if whole_rows else 16, max(16, _next_pow2(rows))),
                BD=bd, BK=min(block_features or (bd if whole_rows else 32), bd),
                BHD=max(16, _next_pow2(d // heads)), BH=max(16, _next_pow2(heads)),
                num_warps=8, num_stages=2)


def _outputs(x: Tensor, heads: int, tokens: int) -> Tuple[Tensor, ...]:
    """The results' storage: queries (B, N, H, hd), keys (B, T, H, hd), values
    (B, T, d), step sizes (B, T, H), summaries (B, U, d) (its fake's too)."""
    b, n, d = x.shape
    new = lambda *shape: x.new_empty(*shape, dtype=torch.float32)  # noqa: E731
    return new(b, n, heads, d // heads), new(b, tokens, heads, d // heads), new(b, tokens, d), \
        new(b, tokens, heads)


def _as_heads(queries: Tensor, keys: Tensor, values: Tensor, token_lr: Tensor
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    heads = queries.shape[2]
    return (queries.permute(2, 0, 1, 3), keys.permute(2, 0, 1, 3),
            values.unflatten(-1, (heads, -1)).permute(2, 0, 1, 3), token_lr.permute(2, 0, 1))


def _project(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, store: Tensor,
             num_updates: int, chunk_size: int, max_lr: float, operand_dtype: torch.dtype,
             block_rows: Optional[int], block_features: Optional[int]
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The operator's implementation: allocate and launch (checked arguments)."""
    check_runnable(x, operand_dtype)
    b, n, d = x.shape
    heads, hd = gamma.shape[0] // 2, gamma.shape[1]
    u, L = num_updates, chunk_size
    queries, keys, values, token_lr = _outputs(x, heads, u * L)
    summary = x.new_empty(b, u, d, dtype=torch.float32)
    if x.numel():
        for name, t in (('x', x), ('queries', queries), ('keys', keys), ('values', values),
                        ('token_lr', token_lr)):
            check_span(name, min(L, t.shape[1]) or 1, t, row_dim=1)
        tiles = projection_tiles(d, heads, min(L, n), block_rows, block_features,
                                 operand_dtype)
        kernels, cfg = launch_config(operand_dtype, x.device)
        chunks = cdiv(n, L)
        kernels.project_kernel[(b * chunks,)](
            x, weight, bias, gamma, store, queries, keys, values, token_lr, summary,
            n, L, chunks, u, d, heads, hd, max_lr, RMS_EPS,
            *x.stride(), *weight.stride(), *gamma.stride(), store.stride(0),
            *queries.stride(), *keys.stride(), *values.stride(), *token_lr.stride(),
            *summary.stride(), DTYPE=cfg['DTYPE'], PREC=cfg['PREC'], **tiles)
    return (*_as_heads(queries, keys, values, token_lr), summary)


_project_op = torch.library.custom_op('convneur_mm::memory_project', _project, mutates_args=())


@_project_op.register_fake
def _project_fake(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, store: Tensor,
                  num_updates: int, chunk_size: int, max_lr: float, operand_dtype: torch.dtype,
                  block_rows: Optional[int], block_features: Optional[int]
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    heads = gamma.shape[0] // 2
    b, _, d = x.shape
    return (*_as_heads(*_outputs(x, heads, num_updates * chunk_size)),
            x.new_empty(b, num_updates, d, dtype=torch.float32))
