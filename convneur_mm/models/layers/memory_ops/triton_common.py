"""The device functions the memory's Triton kernels share (imports triton):
the MLP's products and GELU, LayerNorm over a row, column blocks and tiles.

Import this module only through an op's kernels (``kernels.availability.load_kernels``):
``triton.jit`` picks the interpreter when a function is decorated, so
``TRITON_INTERPRET=1`` must be set before it is first imported.

Every kernel is plain pointer arithmetic with masks (no block pointers, so the
same source runs on triton 3.6 to 3.9). Products take operands of the
``DTYPE`` constexpr (float32, float16 or bfloat16) and accumulate in float32;
weights arrive in DTYPE (the wrappers cast them once per call, so no program
converts its weight tiles), W_0 of a decomposed read in float32 (its whole
state ``a_t W_0 + dW`` formed in float32 registers, ``whole_state``);
LayerNorm statistics, GELU, the residual and the loss weighting stay float32.
A row's features are held in the power-of-two block ``BD`` or, where a
launch passes ``BE > 0``, in ``BD`` and a second block of ``BE``
(``tiles.column_blocks``; ``tiles.tile_config`` and the projections'
``projection_tiles`` take two for M4's 160 as 128 + 32, not 256):
products over the features add both blocks' products, row statistics both
blocks' sums. The hidden width is walked in ``BH`` blocks; all are masked,
so any width works. GELU is exact (erf) unless the
GELU_TANH constexpr asks for its tanh form (one exp per element, as
``F.gelu(approximate='tanh')``).

Tiles: a product kernel's program serves the ``ITERS`` tiles
``program_id * ITERS ...`` in turn (persistent programs, ``launcher.launch_kernel``);
by default one. ptxas compiles ``ITERS=1`` to the code of a kernel without the loop.

Addressing: each program's base offset is an int64 scalar (tensors may pass
2**31 elements); offsets inside a tile are int32 (the wrappers bound a tile's
span), which keeps the per-element address arithmetic out of 64 bits.
"""
import triton
import triton.language as tl

# module-level values a jit function reads must be constexpr
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def tanh_form(x):
    """(s, u') of GELU's tanh form x s: s = sigmoid(2u) = (1 + tanh(u)) / 2,
    u = sqrt(2 / pi) (x + 0.044715 x^3), as F.gelu(approximate='tanh')."""
    # tensors lead each product: a module constant on the left is a constexpr
    # whose product with a tensor the interpreter cannot exponentiate
    sq = x * x
    # exp(-2u) capped at e^80: no overflow to inf; s stays >= 1.8e-35 where u < -40,
    # which no activation reaches
    s = 1.0 / (1.0 + tl.exp(tl.minimum(x * (sq * GELU_CUBIC + 1.0) * SQRT_2_PI * -2.0, 80.0)))
    return s, (sq * GELU_CUBIC * 3.0 + 1.0) * SQRT_2_PI


@triton.jit
def gelu(x, GELU_TANH: tl.constexpr):
    # exact (erf) GELU, as F.gelu's default; GELU_TANH: its tanh form, one exp
    if GELU_TANH:
        s, _ = tanh_form(x)
        return x * s
    return 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))


@triton.jit
def gelu_grad(x, GELU_TANH: tl.constexpr):
    if GELU_TANH:  # s + 2 x s (1 - s) u'
        s, du = tanh_form(x)
        return s + 2.0 * x * s * (1.0 - s) * du
    cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
    return cdf + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI


@triton.jit
def whole_state(base, delta, carry):
    """A decomposed state's tile ``carry * base + delta`` in float32: one
    product at float32 accuracy where ``carry * (x @ base)`` and a 16-bit
    ``x @ delta`` took two (a 16-bit delta tile and its product fewer held)."""
    return carry * base.to(tl.float32) + delta.to(tl.float32)


@triton.jit
def pre_block(x_tile, xo, w1_ptr, s1_d, s1_k, b1_ptr, sb1_d, sb1_k, carry, cols, cmask, hid,
               HID, DTYPE: tl.constexpr, PREC: tl.constexpr, DECOMPOSED: tl.constexpr,
               BASE_PREC: tl.constexpr):
    """x @ w1[cols, hid] for a block of rows at the columns ``cols`` (``x_tile``
    float32, ``xo`` the same in DTYPE); DECOMPOSED: x @ (carry * base1 + w1)[:, hid] at
    float32 accuracy (see ``mlp_rows``)."""
    mask1 = cmask[:, None] & (hid < HID)[None, :]
    w1 = tl.load(w1_ptr + cols[:, None] * s1_d + hid[None, :] * s1_k, mask=mask1, other=0.0)
    if DECOMPOSED:
        b1 = tl.load(b1_ptr + cols[:, None] * sb1_d + hid[None, :] * sb1_k, mask=mask1,
                     other=0.0)
        return tl.dot(x_tile, whole_state(b1, w1, carry), input_precision=BASE_PREC)
    return tl.dot(xo, w1.to(DTYPE), input_precision=PREC)


@triton.jit
def times_w2t(dy, dyo, w2_ptr, s2_k, s2_d, b2_ptr, sb2_k, sb2_d, carry, cols, cmask, hid, HID,
               DTYPE: tl.constexpr, PREC: tl.constexpr, DECOMPOSED: tl.constexpr,
               BASE_PREC: tl.constexpr):
    """dy @ w2[hid, cols]^T, (BM, cols) -> (BM, BH): a gradient at the MLP's
    output carried to its hidden block (``dy`` float32, ``dyo`` in DTYPE)."""
    mask = cmask[:, None] & (hid < HID)[None, :]
    w2t = tl.load(w2_ptr + hid[None, :] * s2_k + cols[:, None] * s2_d, mask=mask, other=0.0)
    if DECOMPOSED:
        b2t = tl.load(b2_ptr + hid[None, :] * sb2_k + cols[:, None] * sb2_d, mask=mask,
                      other=0.0)
        return tl.dot(dy, whole_state(b2t, w2t, carry), input_precision=BASE_PREC)
    return tl.dot(dyo, w2t.to(DTYPE), input_precision=PREC)


@triton.jit
def times_w1t(dp, w1_ptr, s1_d, s1_k, b1_ptr, sb1_d, sb1_k, carry, cols, cmask, hid, HID,
               DTYPE: tl.constexpr, PREC: tl.constexpr, DECOMPOSED: tl.constexpr,
               BASE_PREC: tl.constexpr):
    """dp @ w1[cols, hid]^T, (BM, BH) float32 -> (BM, cols): a gradient at a
    hidden block carried to the MLP's input columns ``cols``."""
    mask = (hid < HID)[:, None] & cmask[None, :]
    w1t = tl.load(w1_ptr + hid[:, None] * s1_k + cols[None, :] * s1_d, mask=mask, other=0.0)
    if DECOMPOSED:
        b1t = tl.load(b1_ptr + hid[:, None] * sb1_k + cols[None, :] * sb1_d, mask=mask,
                      other=0.0)
        return tl.dot(dp, whole_state(b1t, w1t, carry), input_precision=BASE_PREC)
    return tl.dot(dp.to(DTYPE), w1t.to(DTYPE), input_precision=PREC)


@triton.jit
def columns(D, BD: tl.constexpr, BE: tl.constexpr):
    """A row's column blocks and their masks: 0..BD and, with BE > 0,
    BD..BD + BE, a width split into two powers of two (M4's 160 as
    128 + 32, not padded to 256). Without BE the second repeats the first:
    what is computed from it is only used under ``BE > 0`` (the compiler
    drops the rest)."""
    cols = tl.arange(0, BD)
    cols_b = cols
    if BE > 0:
        cols_b = BD + tl.arange(0, BE)
    return cols, cols < D, cols_b, cols_b < D


@triton.jit
def row_sum(a, a_b, BE: tl.constexpr):
    """Each row's sum over both column blocks."""
    total = tl.sum(a, axis=1)
    if BE > 0:
        total += tl.sum(a_b, axis=1)
    return total


@triton.jit
def load_tile(base, rows, s_row, cols, s_col, mask):
    """A (rows, cols) tile as float32, zero outside ``mask``."""
    return tl.load(base + (rows[:, None] * s_row + cols[None, :] * s_col), mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def times_w2_into(act, acc, w2_ptr, s2_k, s2_d, b2_ptr, sb2_k, sb2_d, carry, cols, cmask, hid,
                   HID, DTYPE: tl.constexpr, PREC: tl.constexpr, DECOMPOSED: tl.constexpr,
                   BASE_PREC: tl.constexpr):
    """acc + act @ w2[hid, cols]: a hidden block's share of the MLP's output
    columns ``cols`` (DECOMPOSED: see ``mlp_rows``)."""
    mask2 = (hid < HID)[:, None] & cmask[None, :]
    w2 = tl.load(w2_ptr + hid[:, None] * s2_k + cols[None, :] * s2_d, mask=mask2, other=0.0)
    if DECOMPOSED:
        b2 = tl.load(b2_ptr + hid[:, None] * sb2_k + cols[None, :] * sb2_d, mask=mask2,
                     other=0.0)
        return tl.dot(act, whole_state(b2, w2, carry), acc=acc, input_precision=BASE_PREC)
    return tl.dot(act.to(DTYPE), w2.to(DTYPE), acc=acc, input_precision=PREC)


@triton.jit
def mlp_rows(x_tile, x_b, w1_ptr, w2_ptr, s1_d, s1_k, s2_k, s2_d,
              b1_ptr, b2_ptr, sb1_d, sb1_k, sb2_k, sb2_d, carry, D, HID,
              BM: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
              DTYPE: tl.constexpr, PREC: tl.constexpr,
              DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr, GELU_TANH: tl.constexpr):
    """gelu(x @ w1) @ w2 for a float32 block of rows, (BM, BD) and (BE > 0)
    its (BM, BE) second column block ``x_b``: returns both blocks of the
    output. The (BM, BH) hidden block lives only in registers. DECOMPOSED:
    the weights are ``carry * base + delta`` (``w1``/``w2`` hold delta), formed
    tile by tile in float32 registers (``whole_state``), and each product
    takes float32 operands (BASE_PREC), so a small update survives 16-bit
    operands."""
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
    hcols = tl.arange(0, BH)
    xo = x_tile.to(DTYPE)
    y = tl.zeros((BM, BD), dtype=tl.float32)
    xo_b = xo
    y_b = y
    if BE > 0:
        xo_b = x_b.to(DTYPE)
        y_b = tl.zeros((BM, BE), dtype=tl.float32)
    for h0 in range(0, HID, BH):
        hid = h0 + hcols
        pre = pre_block(x_tile, xo, w1_ptr, s1_d, s1_k, b1_ptr, sb1_d, sb1_k, carry, cols,
                         cmask, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        if BE > 0:
            pre += pre_block(x_b, xo_b, w1_ptr, s1_d, s1_k, b1_ptr, sb1_d, sb1_k, carry, cols_b,
                              cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        act = gelu(pre, GELU_TANH)
        y = times_w2_into(act, y, w2_ptr, s2_k, s2_d, b2_ptr, sb2_k, sb2_d, carry, cols, cmask,
                           hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        if BE > 0:
            y_b = times_w2_into(act, y_b, w2_ptr, s2_k, s2_d, b2_ptr, sb2_k, sb2_d, carry,
                                 cols_b, cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
    return y, y_b


@triton.jit
def cols_step(x, xo, dy, dyo, w1, w2t, b1, b2t, x_b, xo_b, dy_b, dyo_b, w1_b, w2t_b, b1_b,
               b2t_b, acc1, acc2, acc1_b, acc2_b, BE: tl.constexpr, DTYPE: tl.constexpr,
               PREC: tl.constexpr, DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr,
               GELU_TANH: tl.constexpr):
    """One block of rows of a weight-gradient pass over a hidden block j:
    with pre_j = x @ w1[:, j] recomputed and dy the gradient at the MLP's
    output, ``acc1 += x^T (gelu'(pre_j) * (dy @ w2[j]^T))`` (w1's block) and
    ``acc2 += gelu(pre_j)^T dy`` (w2's), for the first column block and
    (BE > 0) the second (``*_b``). ``w1`` (BD, BH) and ``w2t`` (BD, BH) in
    DTYPE; DECOMPOSED: the float32 whole states ``b1``, ``b2t``
    (``whole_state``) times float32 ``x``, ``dy`` at BASE_PREC instead."""
    if DECOMPOSED:
        pre = tl.dot(x, b1, input_precision=BASE_PREC)
        back = tl.dot(dy, b2t, input_precision=BASE_PREC)
    else:
        pre = tl.dot(xo, w1, input_precision=PREC)
        back = tl.dot(dyo, w2t, input_precision=PREC)
    if BE > 0:
        if DECOMPOSED:
            pre = tl.dot(x_b, b1_b, acc=pre, input_precision=BASE_PREC)
            back = tl.dot(dy_b, b2t_b, acc=back, input_precision=BASE_PREC)
        else:
            pre = tl.dot(xo_b, w1_b, acc=pre, input_precision=PREC)
            back = tl.dot(dyo_b, w2t_b, acc=back, input_precision=PREC)
    d_pre = (back * gelu_grad(pre, GELU_TANH)).to(DTYPE)
    act = gelu(pre, GELU_TANH).to(DTYPE)
    acc1 = tl.dot(tl.trans(xo), d_pre, acc=acc1, input_precision=PREC)
    acc2 = tl.dot(tl.trans(act), dyo, acc=acc2, input_precision=PREC)
    if BE > 0:
        acc1_b = tl.dot(tl.trans(xo_b), d_pre, acc=acc1_b, input_precision=PREC)
        acc2_b = tl.dot(tl.trans(act), dyo_b, acc=acc2_b, input_precision=PREC)
    return acc1, acc2, acc1_b, acc2_b


@triton.jit
def layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE: tl.constexpr):
    """LayerNorm without affine over the D valid columns of both column
    blocks; padded columns 0. Returns both blocks' normed rows and rstd."""
    mean = row_sum(y, y_b, BE) / D
    centered = tl.where(cmask[None, :], y - mean[:, None], 0.0)
    centered_b = centered
    if BE > 0:
        centered_b = tl.where(cmask_b[None, :], y_b - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(row_sum(centered * centered, centered_b * centered_b, BE) / D + eps)
    return centered * rstd[:, None], centered_b * rstd[:, None], rstd


@triton.jit
def ln_backward_rows(y, normed, y_b, normed_b, rstd, D, BE: tl.constexpr):
    """LayerNorm's input gradient from the gradient ``y`` at its output N,
    both column blocks: rstd (y - mean(y) - N mean(y N))
    (``common.ln_backward``), and mean(y N)."""
    mean_yn = row_sum(y * normed, y_b * normed_b, BE) / D
    mean_y = row_sum(y, y_b, BE) / D
    grad = rstd[:, None] * (y - mean_y[:, None] - normed * mean_yn[:, None])
    grad_b = grad
    if BE > 0:
        grad_b = rstd[:, None] * (y_b - mean_y[:, None] - normed_b * mean_yn[:, None])
    return grad, grad_b, mean_yn


@triton.jit
def hidden_block(pid, hidden_blocks, HID, BH: tl.constexpr):
    """A weights' pass tile: its group of rows (``pid // hidden_blocks``) and
    the hidden units of its block, with their mask."""
    hid = (pid % hidden_blocks) * BH + tl.arange(0, BH)
    return pid // hidden_blocks, hid, hid < HID


@triton.jit
def weight_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols, cmask, hid, hmask):
    """w1[cols, hid] and w2[hid, cols]^T, (cols, BH) tiles as stored."""
    wmask = cmask[:, None] & hmask[None, :]
    w1 = tl.load(w1_ptr + (cols[:, None] * s1_d + hid[None, :] * s1_k), mask=wmask, other=0.0)
    w2t = tl.load(w2_ptr + (hid[None, :] * s2_k + cols[:, None] * s2_d), mask=wmask, other=0.0)
    return w1, w2t


@triton.jit
def store_weight_grads(g1_ptr, g2_ptr, out, acc1, acc2, scale, D, HID, cols, cmask, hid,
                        hmask):
    """One column block of a (D, HID) and a (HID, D) weight gradient from ``out``."""
    tl.store(g1_ptr + out + (cols[:, None] * HID + hid[None, :]), acc1 * scale,
             mask=cmask[:, None] & hmask[None, :])
    tl.store(g2_ptr + out + (hid[:, None] * D + cols[None, :]), acc2 * scale,
             mask=hmask[:, None] & cmask[None, :])


@triton.jit
def cols_rows(x_base, dy_base, sx_n, sx_d, r0, c, L, N, D, cols, cmask, cols_b, cmask_b, w1,
               w2t, b1, b2t, w1_b, w2t_b, b1_b, b2t_b, acc1, acc2, acc1_b, acc2_b,
               ROWS: tl.constexpr, BE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
               DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr, GELU_TANH: tl.constexpr):
    """``cols_step`` over ROWS rows of chunk c (of N tokens) from row ``r0``:
    its inputs x (a read's tokens, a write's keys; strided) and the gradient
    at the MLP's output ((L, D) rows), both column blocks; DECOMPOSED: ``b1``,
    ``b2t`` (and ``*_b``) the float32 whole states (``whole_state``)."""
    rows = r0 + tl.arange(0, ROWS)
    rmask = (rows < L) & (c * L + rows < N)
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_base + (rows[:, None] * sx_n + cols[None, :] * sx_d), mask=mask, other=0.0)
    dyo = tl.load(dy_base + (rows[:, None] * D + cols[None, :]), mask=mask, other=0.0)
    x_b = x
    dyo_b = dyo
    if BE > 0:
        mask_b = rmask[:, None] & cmask_b[None, :]
        x_b = tl.load(x_base + (rows[:, None] * sx_n + cols_b[None, :] * sx_d), mask=mask_b,
                      other=0.0)
        dyo_b = tl.load(dy_base + (rows[:, None] * D + cols_b[None, :]), mask=mask_b, other=0.0)
    if DECOMPOSED:  # the whole states' products take float32 operands
        return cols_step(x.to(tl.float32), x.to(DTYPE), dyo.to(tl.float32), dyo, w1, w2t, b1,
                          b2t, x_b.to(tl.float32), x_b.to(DTYPE), dyo_b.to(tl.float32), dyo_b,
                          w1_b, w2t_b, b1_b, b2t_b, acc1, acc2, acc1_b, acc2_b, BE, DTYPE,
                          PREC, True, BASE_PREC, GELU_TANH)
    xo = x.to(DTYPE)
    xo_b = x_b.to(DTYPE)
    return cols_step(xo, xo, dyo, dyo, w1, w2t, w1, w2t, xo_b, xo_b, dyo_b, dyo_b, w1_b, w2t_b,
                      w1_b, w2t_b, acc1, acc2, acc1_b, acc2_b, BE, DTYPE, PREC, False, PREC,
                      GELU_TANH)
