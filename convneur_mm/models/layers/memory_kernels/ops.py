"""Python entry points of the fused memory kernels: checks, launches, availability.

Forward only: nothing here records autograd history, so these functions serve
inference (``torch.no_grad()``); training keeps the PyTorch path of
``memory_ops``. Inputs are float32 (the memory's states and features stay
float32); ``operand_dtype`` is the dtype of the products' operands, with
float32 accumulation (float32 operands multiply in IEEE float32, not TF32).
"""
import functools
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..memory_ops import LN_EPS, MemoryWeights

OPERAND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# a program holds whole rows: 256 is the widest row whose tiles compile
# without register spills (16 rows x 256 float32 accumulators, 8 warps)
MAX_HEAD_DIM = 256
_INTERPRETER_HINT = ('on a CPU they run only in Triton\'s interpreter: set TRITON_INTERPRET=1 '
                     'before convneur_mm.models.layers.memory_kernels.kernels is imported')


@functools.lru_cache(maxsize=None)
def _load_kernels() -> Tuple[object, Optional[str], bool]:
    """(kernels module or None, why not, whether it runs in the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return None, f'triton is not installed ({err})', False
    try:
        from . import kernels
    except Exception as err:  # a triton too old or broken: say so, never crash 'auto'
        return None, f'the Triton memory kernels failed to import: {err!r}', False
    interpreted = type(kernels.read_kernel).__name__ == 'InterpretedFunction'
    return kernels, None, interpreted


@functools.lru_cache(maxsize=None)
def _reason(device: torch.device, head_dim: Optional[int],
            operand_dtype: Optional[torch.dtype]) -> Optional[str]:
    if head_dim is not None and not 1 <= head_dim <= MAX_HEAD_DIM:
        return (f'memory head dim {head_dim} is outside the kernels\' range 1..{MAX_HEAD_DIM} '
                '(their register tiles hold whole rows)')
    if operand_dtype is not None and operand_dtype not in OPERAND_DTYPES:
        return f'operand dtype {operand_dtype} is not one of {OPERAND_DTYPES}'
    kernels, why, interpreted = _load_kernels()
    if kernels is None:
        return why
    if interpreted:
        if operand_dtype == torch.bfloat16:
            return 'Triton\'s interpreter cannot compute in bfloat16 (it multiplies bit patterns)'
        return None
    if device.type != 'cuda':
        return f'the memory kernels run on CUDA devices, not on {device.type} ({_INTERPRETER_HINT})'
    if not torch.cuda.is_available():
        return 'CUDA is not available'
    if torch.version.hip is None:
        capability = torch.cuda.get_device_capability(device)
        if capability < (7, 0):
            return f'Triton needs compute capability 7.0 or newer; this GPU has {capability}'
        if operand_dtype == torch.bfloat16 and capability < (8, 0):
            return ('bfloat16 products need compute capability 8.0 or newer; '
                    f'this GPU has {capability}')
    return None


def unavailable_reason(device, head_dim: Optional[int] = None,
                       operand_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the fused memory kernels cannot run here, or None when they can.

    Args:
        device: where the memory's tensors live (``torch.device`` or str).
        head_dim: the memory's head width d, if the shape is to be checked.
        operand_dtype: the products' operand dtype, if it is to be checked.
    """
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    return _reason(device, head_dim, operand_dtype)


def kernels_available(device, head_dim: Optional[int] = None,
                      operand_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the fused memory kernels can run here (see ``unavailable_reason``).

    Args:
        device: where the memory's tensors live (``torch.device`` or str).
        head_dim: the memory's head width d, if the shape is to be checked.
        operand_dtype: the products' operand dtype, if it is to be checked.
    """
    return unavailable_reason(device, head_dim, operand_dtype) is None


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(d: int, rows: int, block_rows: Optional[int], block_hidden: Optional[int],
            operand_dtype: torch.dtype, decomposed: bool = False) -> dict:
    """Tile sizes and launch options.

    tl.dot needs blocks of at least 16. The defaults are the largest tiles
    whose float32 accumulators compile without register spills for sm_80 and
    sm_90 (ptxas, triton 3.7) at two pipeline stages, which also keeps shared
    memory near 100 KB or below; float32 operands (CUDA-core products) and
    the decomposed read (twice the operand tiles) take smaller tiles. They
    are not tuned by timing."""
    bd = max(16, _next_pow2(d))
    _check_tiles(block_rows, block_hidden)
    if operand_dtype == torch.float32 or decomposed:
        bm, bh = 16, 16
    else:
        bm, bh = (32, 32) if bd <= 128 else (16, 32)
    bm = block_rows or min(bm, max(16, _next_pow2(rows)))
    return dict(BM=bm, BD=bd, BH=block_hidden or bh, num_warps=4 if bd <= 128 else 8,
                num_stages=2)


def _check_tiles(block_rows: Optional[int], block_hidden: Optional[int]) -> None:
    for name, value in (('block_rows', block_rows), ('block_hidden', block_hidden)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f'{name} must be a power of two >= 16, got {value}')


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(tensors: Sequence[Tuple[str, Tensor, Tuple[str, ...]]],
           operand_dtype: torch.dtype, tiles: Tuple[Optional[int], Optional[int]]) -> None:
    """Tile sizes, shapes (named sizes must agree wherever they appear),
    float32, one device, no autograd: each failure an error naming the
    argument."""
    _check_tiles(*tiles)
    sizes = {}
    for name, t, shape in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f'{name} must be a tensor, got {type(t).__name__}')
        if t.dim() != len(shape):
            raise ValueError(f'{name} must have {len(shape)} dims, got shape {tuple(t.shape)}')
        for axis, (size_name, got) in enumerate(zip(shape, t.shape)):
            want, where, want_axis = sizes.setdefault(size_name, (got, name, axis))
            if want != got:
                raise ValueError(f'{name} has size {got} in dim {axis}, but {where} has '
                                 f'{want} in dim {want_axis} for the same quantity')
        if t.dtype != torch.float32:
            raise TypeError(f'the memory kernels take float32 tensors; {name} is {t.dtype}')
    first = tensors[0][1]
    for name, t, _ in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f'{name} is on {t.device}, {tensors[0][0]} on {first.device}')
    if operand_dtype not in OPERAND_DTYPES:
        raise ValueError(f'operand_dtype must be one of {OPERAND_DTYPES}, got {operand_dtype}')
    if torch.is_grad_enabled() and any(t.requires_grad for _, t, _ in tensors):
        raise RuntimeError('the memory kernels are forward-only (no autograd): call them under '
                           'torch.no_grad(), or use memory_ops for training')


def _check_runnable(t: Tensor, operand_dtype: torch.dtype) -> None:
    why = unavailable_reason(t.device, t.shape[-1], operand_dtype)
    if why is not None:
        raise RuntimeError(f'the fused memory kernels cannot run: {why}')


def _launch_config(operand_dtype: torch.dtype, device: torch.device):
    """The kernels module and the constexprs of an operand dtype.

    float32 operands multiply in IEEE float32 (as the PyTorch path with TF32
    off). The W_0 part of a decomposed read needs float32 accuracy at tensor
    core speed: three TF32 products (``tf32x3``) on NVIDIA GPUs that have
    TF32, IEEE float32 elsewhere (and in the interpreter, which ignores it)."""
    import triton.language as tl
    kernels, _, interpreted = _load_kernels()
    dtype = {torch.float32: tl.float32, torch.float16: tl.float16,
             torch.bfloat16: tl.bfloat16}[operand_dtype]
    base = 'ieee'
    if (not interpreted and device.type == 'cuda' and torch.version.hip is None and
            torch.cuda.get_device_capability(device) >= (8, 0)):
        base = 'tf32x3'
    return kernels, dict(DTYPE=dtype, PREC='ieee', BASE_PREC=base)


def _check_span(name: str, rows: int, t: Tensor, row_dim: int = -2) -> None:
    """Offsets inside a tile are int32: a chunk's ``rows`` along ``row_dim``,
    with the features of the last dim (unless that is the row dim), must span
    < 2**31 elements. The outer dims are addressed by int64 base offsets."""
    span = rows * abs(t.stride(row_dim))
    if row_dim % t.dim() != t.dim() - 1:
        span += t.shape[-1] * abs(t.stride(-1))
    if span >= 2**31:
        raise ValueError(f'{name}: a chunk of {rows} rows with strides {t.stride()} spans '
                         'more than 2**31 elements, beyond the kernels\' int32 tile offsets')


def memory_grads_fused(weights: MemoryWeights, keys: Tensor, values: Tensor, token_lr: Tensor,
                       operand_dtype: Optional[torch.dtype] = None, *,
                       block_rows: Optional[int] = None,
                       block_hidden: Optional[int] = None) -> MemoryWeights:
    """``memory_ops.memory_grads`` as two fused kernels (forward only, for
    inference: no autograd graph is recorded).

    Pass 1 runs per block of a chunk's rows: the MLP at the shared weights, its
    LayerNorm and the closed-form LayerNorm backward in registers, writing
    only the (tokens, d) gradient at the MLP's output and per-block partial
    sums of d_g. Pass 2 runs per (chunk, block of hidden units): it recomputes
    that block of ``keys @ w1`` and accumulates its slices of the chunk's
    G1 and G2 in float32 registers. No (tokens, 4d) tensor reaches memory.

    Args:
        weights: fast weights shared by all chunks of a group: ``w1`` (G, d, 4d),
            ``w2`` (G, 4d, d), ``g`` (G, d); float32.
        keys, values: (G, C, L, d) float32: C chunks of L tokens per group;
            or (G, B, U, L, d), the C = B * U chunks as U per image, in any
            strides (the projections' views of B images, without a copy).
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
    _check([('keys', keys, (*lead, 'L', 'd')), ('values', values, (*lead, 'L', 'd')),
            ('token_lr', token_lr, (*lead, 'L')), ('weights.w1', w1, ('G', 'd', 'h')),
            ('weights.w2', w2, ('G', 'h', 'd')), ('weights.g', g, ('G', 'd'))], operand_dtype,
           (block_rows, block_hidden))
    _check_runnable(keys, operand_dtype)
    groups, length, d = keys.shape[0], keys.shape[-2], keys.shape[-1]
    per_image = keys.shape[2] if per_image_chunks else keys.shape[1]
    chunks = keys.shape[1] * per_image if per_image_chunks else per_image

    def strides(t: Tensor) -> Tuple[int, ...]:
        """(group, image, chunk, rows...) strides; one image of C chunks for 4-D."""
        return t.stride() if per_image_chunks else (t.stride(0), 0, *t.stride()[1:])
    hidden = w1.shape[-1]
    opts = dict(device=keys.device, dtype=torch.float32)
    g1 = torch.empty(groups, chunks, d, hidden, **opts)
    g2 = torch.empty(groups, chunks, hidden, d, **opts)
    if groups * chunks == 0 or length == 0 or hidden == 0 or d == 0:
        return MemoryWeights(g1.zero_(), g2.zero_(), torch.zeros(groups, chunks, d, **opts))
    _check_span('keys', length, keys)
    _check_span('values', length, values)
    _check_span('token_lr', length, token_lr, row_dim=-1)
    _check_span('the gradient at the MLP output', length, keys.new_empty(0, d))
    tiles = _blocks(d, length, block_rows, block_hidden, operand_dtype)
    kernels, cfg = _launch_config(operand_dtype, keys.device)
    cfg.pop('BASE_PREC')
    row_blocks, hidden_blocks = _cdiv(length, tiles['BM']), _cdiv(hidden, tiles['BH'])
    d_hidden = torch.empty(groups, chunks, length, d, **opts)
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
        loss_scale, **tiles, **cfg)
    return MemoryWeights(g1, g2, d_g.sum(dim=1).view(groups, chunks, d))


# rows of one launch "chunk" when a read has no chunks of its own: bounds
# the int32 offsets inside a tile
_ROWS_PER_PSEUDO_CHUNK = 4096


def _read(weights: MemoryWeights, x: Tensor, out: Tensor, length: int,
          operand_dtype: torch.dtype, base: Optional[MemoryWeights], carry: Optional[Tensor],
          block_rows: Optional[int], block_hidden: Optional[int]) -> Tensor:
    """Launch the read kernel: x and out (H, B, N, d), weights (H, B, C, ...),
    base (H, ...) or None, carry (H, B, C) or None; token n reads chunk
    n // length."""
    w1, w2, g = weights
    heads, batch, n, d = x.shape
    chunks, hidden = w1.shape[2], w1.shape[-1]
    if out.numel() == 0:
        return out
    _check_span('x', length, x)
    _check_span('out', length, out)
    decomposed = base is not None
    tiles = _blocks(d, min(length, n), block_rows, block_hidden, operand_dtype, decomposed)
    kernels, cfg = _launch_config(operand_dtype, x.device)
    row_blocks = _cdiv(length, tiles['BM'])
    if decomposed:
        b1, b2, c_strides = base.w1, base.w2, carry.stride()
    else:  # unread (DECOMPOSED is a constexpr): any pointers and strides
        b1, b2, c_strides = w1[:, 0, 0], w2[:, 0, 0], (0, 0, 0)
    kernels.read_kernel[(heads * batch * chunks * row_blocks,)](
        x, w1, w2, g, out, b1, b2, carry if decomposed else x,
        batch, chunks, n, length, d, hidden, row_blocks,
        *x.stride(), *w1.stride(), *w2.stride(), *g.stride(), *out.stride(),
        *b1.stride(), *b2.stride(), *c_strides,
        LN_EPS, DECOMPOSED=decomposed, **tiles, **cfg)
    return out


def _base_args(base: Optional[MemoryWeights], carry: Optional[Tensor], heads_dim: str,
               carry_shape: Tuple[str, ...]) -> list:
    if (base is None) != (carry is None):
        raise ValueError('a decomposed read needs both base and carry')
    if base is None:
        return []
    return [('base.w1', base.w1, (heads_dim, 'd', 'h')),
            ('base.w2', base.w2, (heads_dim, 'h', 'd')), ('carry', carry, carry_shape)]


def memory_forward_fused(weights: MemoryWeights, x: Tensor,
                         operand_dtype: Optional[torch.dtype] = None,
                         base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None,
                         *, block_rows: Optional[int] = None,
                         block_hidden: Optional[int] = None) -> Tensor:
    """``memory_ops.memory_forward`` as one fused kernel (forward only, for
    inference: no autograd graph is recorded): the (tokens, 4d) hidden
    activations and the LayerNorm stay in registers.

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
            ``operand_dtype``, as in ``memory_forward``.
        carry: (G,) a_t of each group's state, with ``base``.
        block_rows, block_hidden: tile sizes (powers of two >= 16) overriding
            the defaults, for tuning and tests.

    Returns:
        (G, M, d) float32: ``x + LN(gelu(x @ w1) @ w2) * (1 + g)``.
    """
    w1, w2, g = weights
    operand_dtype = operand_dtype or torch.float32
    _check([('x', x, ('G', 'M', 'd')), ('weights.w1', w1, ('G', 'd', 'h')),
            ('weights.w2', w2, ('G', 'h', 'd')), ('weights.g', g, ('G', 'd'))] +
           _base_args(base, carry, 'H', ('G',)), operand_dtype, (block_rows, block_hidden))
    groups, m, d = x.shape
    heads = 1 if base is None else base.w1.shape[0]
    if groups % heads:
        raise ValueError(f'{groups} groups are not a whole number per head of {heads} heads')
    _check_runnable(x, operand_dtype)
    out = torch.empty(groups, m, d, device=x.device, dtype=torch.float32)
    # groups as (head, image) pairs, M tokens cut into pseudo-chunks that all
    # read the group's weights (chunk stride 0)
    length = min(max(m, 1), _ROWS_PER_PSEUDO_CHUNK)
    chunks = _cdiv(m, length)
    split = lambda t: t.unflatten(0, (heads, groups // heads))  # noqa: E731
    per_chunk = lambda t: split(t)[:, :, None].expand(  # noqa: E731
        heads, groups // heads, chunks, *t.shape[1:])
    _read(MemoryWeights(per_chunk(w1), per_chunk(w2), per_chunk(g)), split(x), split(out),
          length, operand_dtype, base,
          None if carry is None else split(carry)[:, :, None].expand(-1, -1, chunks),
          block_rows, block_hidden)
    return out


def read_chunks_fused(states: MemoryWeights, queries: Tensor, chunk_size: int,
                      operand_dtype: Optional[torch.dtype] = None,
                      base: Optional[MemoryWeights] = None, carry: Optional[Tensor] = None,
                      *, block_rows: Optional[int] = None,
                      block_hidden: Optional[int] = None) -> Tensor:
    """The memory's read over chunk states with the heads merged, as one fused
    kernel (forward only, for inference: no autograd graph is recorded).

    Token n of head h and image b reads state ``n // chunk_size`` of (h, b);
    the output is written straight into the merged (B, N, H * d) layout, so
    neither the queries' padding to whole chunks nor the heads' merge copies.

    Args:
        states: per-chunk fast weights ``w1`` (H, B, C, d, 4d),
            ``w2`` (H, B, C, 4d, d), ``g`` (H, B, C, d); float32, any strides
            (expanded views work); with ``base``: dW_t for ``w1`` and ``w2``.
        queries: (H, B, N, d) float32, any strides; N <= C * chunk_size.
        chunk_size: tokens per chunk L.
        operand_dtype: dtype of the products' operands (float32, float16,
            bfloat16; None: float32); sums, LayerNorm, GELU and the residual
            stay float32.
        base: W_0 per head, ``w1`` (H, d, 4d), ``w2`` (H, 4d, d): the read is
            then ``carry * (q @ W_0)`` at float32 accuracy plus ``q @ dW`` in
            ``operand_dtype``, as in ``memory_forward``.
        carry: (H, B, C) a_t of each state, with ``base``.
        block_rows, block_hidden: tile sizes (powers of two >= 16) overriding
            the defaults, for tuning and tests.

    Returns:
        (B, N, H * d) float32 read-outs, heads merged as ``NeuralMemory`` does.
    """
    w1, w2, g = states
    operand_dtype = operand_dtype or torch.float32
    _check([('queries', queries, ('H', 'B', 'N', 'd')),
            ('states.w1', w1, ('H', 'B', 'C', 'd', 'h')),
            ('states.w2', w2, ('H', 'B', 'C', 'h', 'd')),
            ('states.g', g, ('H', 'B', 'C', 'd'))] +
           _base_args(base, carry, 'H', ('H', 'B', 'C')), operand_dtype,
           (block_rows, block_hidden))
    heads, batch, n, d = queries.shape
    chunks = w1.shape[2]
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    if n > chunks * chunk_size:
        raise ValueError(f'{n} tokens need {_cdiv(n, chunk_size)} chunk states of '
                         f'{chunk_size} tokens, got {chunks}')
    _check_runnable(queries, operand_dtype)
    out = torch.empty(batch, n, heads * d, device=queries.device, dtype=torch.float32)
    _read(states, queries, out.view(batch, n, heads, d).permute(2, 0, 1, 3), chunk_size,
          operand_dtype, base, carry, block_rows, block_hidden)
    return out
