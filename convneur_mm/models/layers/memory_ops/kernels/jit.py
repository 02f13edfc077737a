"""The Triton kernels of the memory's operations (imports triton).

Import this module only through ``kernels.availability.load_kernels``:
``triton.jit`` picks the interpreter when a kernel is decorated, so
``TRITON_INTERPRET=1`` must be set before this module is first imported.

Every kernel is plain pointer arithmetic with masks (no block pointers, so the
same source runs on triton 3.6 to 3.9). Products take operands of the
``DTYPE`` constexpr (float32, float16 or bfloat16) and accumulate in float32;
weights arrive in DTYPE (the wrappers cast them once per call, so no program
converts its weight tiles), W_0 of a decomposed read in float32;
LayerNorm statistics, GELU, the residual and the loss weighting stay float32.
A row's features are held in the power-of-two block ``BD`` or, where a
launch passes ``BE > 0``, in ``BD`` and a second block of ``BE``
(``launch.column_blocks``; ``launch.tile_config`` and the projections'
``projection_tiles`` take two for M4's 160 as 128 + 32, not 256):
products over the features add both blocks' products, row statistics both
blocks' sums. The hidden width is walked in ``BH`` blocks; all are masked,
so any width works. GELU is exact (erf) unless the
GELU_TANH constexpr asks for its tanh form (one exp per element, as
``F.gelu(approximate='tanh')``).

Tiles: a product kernel's program serves the ``ITERS`` tiles
``program_id * ITERS ...`` in turn (persistent programs, ``launch.launch_kernel``);
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
def _tanh_form(x):
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
def _gelu(x, GELU_TANH: tl.constexpr):
    # exact (erf) GELU, as F.gelu's default; GELU_TANH: its tanh form, one exp
    if GELU_TANH:
        s, _ = _tanh_form(x)
        return x * s
    return 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))


@triton.jit
def _gelu_grad(x, GELU_TANH: tl.constexpr):
    if GELU_TANH:  # s + 2 x s (1 - s) u'
        s, du = _tanh_form(x)
        return s + 2.0 * x * s * (1.0 - s) * du
    cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
    return cdf + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI


@triton.jit
def _pre_block(x_tile, xo, w1_ptr, s1_d, s1_k, b1_ptr, sb1_d, sb1_k, carry, cols, cmask, hid,
               HID, DTYPE: tl.constexpr, PREC: tl.constexpr, DECOMPOSED: tl.constexpr,
               BASE_PREC: tl.constexpr):
    """x @ w1[cols, hid] for a block of rows at the columns ``cols`` (``x_tile``
    float32, ``xo`` the same in DTYPE); DECOMPOSED adds carry * (x @ base1[:, hid]) at float32
    accuracy (see ``_mlp_rows``)."""
    mask1 = cmask[:, None] & (hid < HID)[None, :]
    w1 = tl.load(w1_ptr + cols[:, None] * s1_d + hid[None, :] * s1_k, mask=mask1, other=0.0)
    pre = tl.dot(xo, w1.to(DTYPE), input_precision=PREC)
    if DECOMPOSED:
        b1 = tl.load(b1_ptr + cols[:, None] * sb1_d + hid[None, :] * sb1_k, mask=mask1,
                     other=0.0).to(tl.float32)
        pre += carry * tl.dot(x_tile, b1, input_precision=BASE_PREC)
    return pre


@triton.jit
def _times_w2t(dy, dyo, w2_ptr, s2_k, s2_d, b2_ptr, sb2_k, sb2_d, carry, cols, cmask, hid, HID,
               DTYPE: tl.constexpr, PREC: tl.constexpr, DECOMPOSED: tl.constexpr,
               BASE_PREC: tl.constexpr):
    """dy @ w2[hid, cols]^T, (BM, cols) -> (BM, BH): a gradient at the MLP's
    output carried to its hidden block (``dy`` float32, ``dyo`` in DTYPE)."""
    mask = cmask[:, None] & (hid < HID)[None, :]
    w2t = tl.load(w2_ptr + hid[None, :] * s2_k + cols[:, None] * s2_d, mask=mask, other=0.0)
    out = tl.dot(dyo, w2t.to(DTYPE), input_precision=PREC)
    if DECOMPOSED:
        b2t = tl.load(b2_ptr + hid[None, :] * sb2_k + cols[:, None] * sb2_d, mask=mask,
                      other=0.0).to(tl.float32)
        out += carry * tl.dot(dy, b2t, input_precision=BASE_PREC)
    return out


@triton.jit
def _times_w1t(dp, w1_ptr, s1_d, s1_k, b1_ptr, sb1_d, sb1_k, carry, cols, cmask, hid, HID,
               DTYPE: tl.constexpr, PREC: tl.constexpr, DECOMPOSED: tl.constexpr,
               BASE_PREC: tl.constexpr):
    """dp @ w1[cols, hid]^T, (BM, BH) float32 -> (BM, cols): a gradient at a
    hidden block carried to the MLP's input columns ``cols``."""
    mask = (hid < HID)[:, None] & cmask[None, :]
    w1t = tl.load(w1_ptr + hid[:, None] * s1_k + cols[None, :] * s1_d, mask=mask, other=0.0)
    out = tl.dot(dp.to(DTYPE), w1t.to(DTYPE), input_precision=PREC)
    if DECOMPOSED:
        b1t = tl.load(b1_ptr + hid[:, None] * sb1_k + cols[None, :] * sb1_d, mask=mask,
                      other=0.0).to(tl.float32)
        out += carry * tl.dot(dp, b1t, input_precision=BASE_PREC)
    return out


@triton.jit
def _columns(D, BD: tl.constexpr, BE: tl.constexpr):
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
def _row_sum(a, a_b, BE: tl.constexpr):
    """Each row's sum over both column blocks."""
    total = tl.sum(a, axis=1)
    if BE > 0:
        total += tl.sum(a_b, axis=1)
    return total


@triton.jit
def _load_tile(base, rows, s_row, cols, s_col, mask):
    """A (rows, cols) tile as float32, zero outside ``mask``."""
    return tl.load(base + (rows[:, None] * s_row + cols[None, :] * s_col), mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _times_w2_into(act, acc, w2_ptr, s2_k, s2_d, b2_ptr, sb2_k, sb2_d, carry, cols, cmask, hid,
                   HID, DTYPE: tl.constexpr, PREC: tl.constexpr, DECOMPOSED: tl.constexpr,
                   BASE_PREC: tl.constexpr):
    """acc + act @ w2[hid, cols]: a hidden block's share of the MLP's output
    columns ``cols`` (DECOMPOSED: see ``_mlp_rows``)."""
    mask2 = (hid < HID)[:, None] & cmask[None, :]
    w2 = tl.load(w2_ptr + hid[:, None] * s2_k + cols[None, :] * s2_d, mask=mask2, other=0.0)
    acc = tl.dot(act.to(DTYPE), w2.to(DTYPE), acc=acc, input_precision=PREC)
    if DECOMPOSED:
        b2 = tl.load(b2_ptr + hid[:, None] * sb2_k + cols[None, :] * sb2_d, mask=mask2,
                     other=0.0).to(tl.float32)
        acc += carry * tl.dot(act, b2, input_precision=BASE_PREC)
    return acc


@triton.jit
def _mlp_rows(x_tile, x_b, w1_ptr, w2_ptr, s1_d, s1_k, s2_k, s2_d,
              b1_ptr, b2_ptr, sb1_d, sb1_k, sb2_k, sb2_d, carry, D, HID,
              BM: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
              DTYPE: tl.constexpr, PREC: tl.constexpr,
              DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr, GELU_TANH: tl.constexpr):
    """gelu(x @ w1) @ w2 for a float32 block of rows, (BM, BD) and (BE > 0)
    its (BM, BE) second column block ``x_b``: returns both blocks of the
    output. The (BM, BH) hidden block lives only in registers. DECOMPOSED:
    the weights are ``carry * base + delta`` (``w1``/``w2`` hold delta) and
    each product is ``carry * (x @ base)`` with float32 operands (BASE_PREC)
    plus ``x @ delta`` in DTYPE, so a small update survives 16-bit operands."""
    cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
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
        pre = _pre_block(x_tile, xo, w1_ptr, s1_d, s1_k, b1_ptr, sb1_d, sb1_k, carry, cols,
                         cmask, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        if BE > 0:
            pre += _pre_block(x_b, xo_b, w1_ptr, s1_d, s1_k, b1_ptr, sb1_d, sb1_k, carry, cols_b,
                              cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        act = _gelu(pre, GELU_TANH)
        y = _times_w2_into(act, y, w2_ptr, s2_k, s2_d, b2_ptr, sb2_k, sb2_d, carry, cols, cmask,
                           hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        if BE > 0:
            y_b = _times_w2_into(act, y_b, w2_ptr, s2_k, s2_d, b2_ptr, sb2_k, sb2_d, carry,
                                 cols_b, cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
    return y, y_b


@triton.jit
def _cols_step(x, xo, dy, dyo, w1, w2t, b1, b2t, x_b, xo_b, dy_b, dyo_b, w1_b, w2t_b, b1_b,
               b2t_b, carry, acc1, acc2, acc1_b, acc2_b, BE: tl.constexpr, DTYPE: tl.constexpr,
               PREC: tl.constexpr, DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr,
               GELU_TANH: tl.constexpr):
    """One block of rows of a weight-gradient pass over a hidden block j:
    with pre_j = x @ w1[:, j] recomputed and dy the gradient at the MLP's
    output, ``acc1 += x^T (gelu'(pre_j) * (dy @ w2[j]^T))`` (w1's block) and
    ``acc2 += gelu(pre_j)^T dy`` (w2's), for the first column block and
    (BE > 0) the second (``*_b``). ``w1`` (BD, BH) and ``w2t`` (BD, BH) in
    DTYPE; DECOMPOSED: plus carry times float32 ``b1``, ``b2t``."""
    pre = tl.dot(xo, w1, input_precision=PREC)
    back = tl.dot(dyo, w2t, input_precision=PREC)
    if DECOMPOSED:
        pre += carry * tl.dot(x, b1, input_precision=BASE_PREC)
        back += carry * tl.dot(dy, b2t, input_precision=BASE_PREC)
    if BE > 0:
        pre = tl.dot(xo_b, w1_b, acc=pre, input_precision=PREC)
        back = tl.dot(dyo_b, w2t_b, acc=back, input_precision=PREC)
        if DECOMPOSED:
            pre += carry * tl.dot(x_b, b1_b, input_precision=BASE_PREC)
            back += carry * tl.dot(dy_b, b2t_b, input_precision=BASE_PREC)
    d_pre = (back * _gelu_grad(pre, GELU_TANH)).to(DTYPE)
    act = _gelu(pre, GELU_TANH).to(DTYPE)
    acc1 = tl.dot(tl.trans(xo), d_pre, acc=acc1, input_precision=PREC)
    acc2 = tl.dot(tl.trans(act), dyo, acc=acc2, input_precision=PREC)
    if BE > 0:
        acc1_b = tl.dot(tl.trans(xo_b), d_pre, acc=acc1_b, input_precision=PREC)
        acc2_b = tl.dot(tl.trans(act), dyo_b, acc=acc2_b, input_precision=PREC)
    return acc1, acc2, acc1_b, acc2_b


@triton.jit
def _layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE: tl.constexpr):
    """LayerNorm without affine over the D valid columns of both column
    blocks; padded columns 0. Returns both blocks' normed rows and rstd."""
    mean = _row_sum(y, y_b, BE) / D
    centered = tl.where(cmask[None, :], y - mean[:, None], 0.0)
    centered_b = centered
    if BE > 0:
        centered_b = tl.where(cmask_b[None, :], y_b - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(_row_sum(centered * centered, centered_b * centered_b, BE) / D + eps)
    return centered * rstd[:, None], centered_b * rstd[:, None], rstd


@triton.jit
def _ln_backward_rows(y, normed, y_b, normed_b, rstd, D, BE: tl.constexpr):
    """LayerNorm's input gradient from the gradient ``y`` at its output N,
    both column blocks: rstd (y - mean(y) - N mean(y N))
    (``common.ln_backward``), and mean(y N)."""
    mean_yn = _row_sum(y * normed, y_b * normed_b, BE) / D
    mean_y = _row_sum(y, y_b, BE) / D
    grad = rstd[:, None] * (y - mean_y[:, None] - normed * mean_yn[:, None])
    grad_b = grad
    if BE > 0:
        grad_b = rstd[:, None] * (y_b - mean_y[:, None] - normed_b * mean_yn[:, None])
    return grad, grad_b, mean_yn


@triton.jit
def _residual_rows(k, v, coef, normed, scale, mask):
    """The write loss's chain after the LayerNorm, one column block:
    R = K + N s - V (zero outside ``mask``), D = R c, D s; ``coef`` c per row."""
    resid = tl.where(mask, k + normed * scale[None, :] - v, 0.0)
    d_out = resid * coef[:, None]
    return resid, d_out, d_out * scale[None, :]


@triton.jit
def _output_rows(k, v, normed, scale, mask, k_b, v_b, normed_b, scale_b, mask_b, coef, rstd, D,
                 BE: tl.constexpr):
    """The write loss's chain after the MLP's output, as
    ``pytorch.output_rows``, both column blocks: R = K + N s - V, D = R c,
    D s, mean(D s N) and Dh = LNback(D s), zero outside the masks.
    Returns (R, D, D s, Dh) of each block, then mean(D s N)."""
    resid, d_out, d_normed = _residual_rows(k, v, coef, normed, scale, mask)
    resid_b = resid
    d_out_b = d_out
    d_normed_b = d_normed
    if BE > 0:
        resid_b, d_out_b, d_normed_b = _residual_rows(k_b, v_b, coef, normed_b, scale_b, mask_b)
    d_hidden, d_hidden_b, ln_y = _ln_backward_rows(d_normed, normed, d_normed_b, normed_b, rstd,
                                                   D, BE)
    d_hidden = tl.where(mask, d_hidden, 0.0)
    if BE > 0:
        d_hidden_b = tl.where(mask_b, d_hidden_b, 0.0)
    return (resid, d_out, d_normed, d_hidden, resid_b, d_out_b, d_normed_b, d_hidden_b, ln_y)


@triton.jit
def _state_of(group, B, C):
    """(c, h, b, c64) of a read's state ``group`` = (h * B + b) * C + c: the
    chunk c as int32 (for row masks) and the int64 offsets' indices."""
    c = group % C
    hb = group // C
    return c, (hb // B).to(tl.int64), (hb % B).to(tl.int64), c.to(tl.int64)


@triton.jit
def _chunk_of(chunk, C, U):
    """(gi, c, bi, ci) of a write's ``chunk`` = gi * C + c, int64: chunk c of
    group gi is chunk ci of image bi (U per image)."""
    c = (chunk % C).to(tl.int64)
    return (chunk // C).to(tl.int64), c, c // U, c % U


@triton.jit
def _hidden_block(pid, hidden_blocks, HID, BH: tl.constexpr):
    """A weights' pass tile: its group of rows (``pid // hidden_blocks``) and
    the hidden units of its block, with their mask."""
    hid = (pid % hidden_blocks) * BH + tl.arange(0, BH)
    return pid // hidden_blocks, hid, hid < HID


@triton.jit
def _read_out(x, normed, g_base, sg_d, o_base, rows, so_n, so_d, cols, cmask, mask):
    """Stores x + N * (1 + g), one column block of a read's rows."""
    g = tl.load(g_base + cols * sg_d, mask=cmask, other=0.0).to(tl.float32)
    tl.store(o_base + (rows[:, None] * so_n + cols[None, :] * so_d),
             x + normed * (1.0 + g[None, :]), mask=mask)


@triton.jit
def read_kernel(x_ptr, w1_ptr, w2_ptr, g_ptr, out_ptr, b1_ptr, b2_ptr, carry_ptr,
                B, C, N, L, D, HID, row_blocks, r0,
                sx_h, sx_b, sx_n, sx_d,
                s1_h, s1_b, s1_c, s1_d, s1_k,
                s2_h, s2_b, s2_c, s2_k, s2_d,
                sg_h, sg_b, sg_c, sg_d,
                so_h, so_b, so_n, so_d,
                sb1_h, sb1_d, sb1_k,
                sb2_h, sb2_k, sb2_d,
                sc_h, sc_b, sc_c,
                eps,
                BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                DTYPE: tl.constexpr, PREC: tl.constexpr,
                DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr, ITERS: tl.constexpr = 1,
                GELU_TANH: tl.constexpr = False, BE: tl.constexpr = 0):
    """out = x + LN(gelu(x @ w1) @ w2) * (1 + g), token n of (head h, image b)
    reading the weights of chunk n // L. One program per (h, b, chunk, block
    of BM rows of the chunk from its row ``r0``); x, weights and out are
    addressed by strides, so the caller's layouts (heads split or merged) need
    no copy. DECOMPOSED: see ``_mlp_rows``; base weights per head, carry per
    (h, b, chunk). BE > 0: the columns in two blocks (``_columns``)."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        rb = pid % row_blocks
        group = pid // row_blocks
        c, h, b, c64 = _state_of(group, B, C)

        rows = r0 + rb * BM + tl.arange(0, BM)  # within the chunk
        rmask = (rows < L) & (c * L + rows < N)
        cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
        mask = rmask[:, None] & cmask[None, :]
        mask_b = rmask[:, None] & cmask_b[None, :]
        first = c64 * L  # the chunk's first token

        x_base = x_ptr + (h * sx_h + b * sx_b + first * sx_n)
        x = _load_tile(x_base, rows, sx_n, cols, sx_d, mask)
        x_b = x
        if BE > 0:
            x_b = _load_tile(x_base, rows, sx_n, cols_b, sx_d, mask_b)
        carry = 1.0
        if DECOMPOSED:
            carry = tl.load(carry_ptr + (h * sc_h + b * sc_b + c64 * sc_c)).to(tl.float32)
        y, y_b = _mlp_rows(x, x_b, w1_ptr + (h * s1_h + b * s1_b + c64 * s1_c),
                           w2_ptr + (h * s2_h + b * s2_b + c64 * s2_c), s1_d, s1_k, s2_k, s2_d,
                           b1_ptr + h * sb1_h, b2_ptr + h * sb2_h, sb1_d, sb1_k, sb2_k, sb2_d,
                           carry, D, HID, BM, BD, BE, BH, DTYPE, PREC, DECOMPOSED, BASE_PREC,
                           GELU_TANH)
        normed, normed_b, _ = _layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE)
        g_base = g_ptr + (h * sg_h + b * sg_b + c64 * sg_c)
        o_base = out_ptr + (h * so_h + b * so_b + first * so_n)
        _read_out(x, normed, g_base, sg_d, o_base, rows, so_n, so_d, cols, cmask, mask)
        if BE > 0:
            _read_out(x_b, normed_b, g_base, sg_d, o_base, rows, so_n, so_d, cols_b, cmask_b,
                      mask_b)


@triton.jit
def _write_inputs(k_base, v_base, k_rows, v_rows, sk_d, sv_d, g_base, sg_d, cols, cmask, mask):
    """A write's keys, values and gain 1 + g at one column block (``k_rows``,
    ``v_rows``: the rows' offsets)."""
    k = _load_tile(k_base, k_rows, 1, cols, sk_d, mask)
    v = _load_tile(v_base, v_rows, 1, cols, sv_d, mask)
    scale = 1.0 + tl.load(g_base + cols * sg_d, mask=cmask, other=0.0).to(tl.float32)
    return k, v, scale


@triton.jit
def _write_rows(k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, dh_ptr, ko_ptr,
                gi, bi, ci, crow, lrow, rmask, first, L, D, HID,
                sk_g, sk_b, sk_c, sk_l, sk_d, sv_g, sv_b, sv_c, sv_l, sv_d,
                slr_g, slr_b, slr_c, slr_l, s1_g, s1_d, s1_k, s2_g, s2_k, s2_d, sg_g, sg_d, eps,
                BM: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
                DTYPE: tl.constexpr, PREC: tl.constexpr, COPY_KEYS: tl.constexpr,
                GELU_TANH: tl.constexpr):
    """The write's chain over a block of BM rows, row i being row ``lrow[i]``
    of chunk ``crow[i]`` after the chunk ``first`` (of image ``bi``, chunk
    ``ci`` of group ``gi`` in the inputs' strides): stores Dh and (COPY_KEYS)
    the keys in DTYPE to (G, C, L, D) rows, and returns the rows' D N (zero
    outside ``rmask``), d_g's terms before ``loss_scale``, of both column blocks."""
    cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
    mask = rmask[:, None] & cmask[None, :]
    mask_b = rmask[:, None] & cmask_b[None, :]
    k_base = k_ptr + (gi * sk_g + bi * sk_b + ci * sk_c)
    v_base = v_ptr + (gi * sv_g + bi * sv_b + ci * sv_c)
    k_rows = crow * sk_c + lrow * sk_l  # each row's offset, strides inside
    v_rows = crow * sv_c + lrow * sv_l
    g_base = g_ptr + gi * sg_g
    k, v, scale = _write_inputs(k_base, v_base, k_rows, v_rows, sk_d, sv_d, g_base, sg_d, cols,
                                cmask, mask)
    k_b = k
    v_b = v
    scale_b = scale
    if BE > 0:
        k_b, v_b, scale_b = _write_inputs(k_base, v_base, k_rows, v_rows, sk_d, sv_d, g_base,
                                          sg_d, cols_b, cmask_b, mask_b)
    y, y_b = _mlp_rows(k, k_b, w1_ptr + gi * s1_g, w2_ptr + gi * s2_g, s1_d, s1_k, s2_k, s2_d,
                       w1_ptr, w2_ptr, 0, 0, 0, 0, 1.0, D, HID, BM, BD, BE, BH, DTYPE, PREC,
                       False, PREC, GELU_TANH)
    normed, normed_b, rstd = _layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE)
    lr = tl.load(lr_ptr + (gi * slr_g + bi * slr_b + ci * slr_c) +
                 (crow * slr_c + lrow * slr_l), mask=rmask, other=0.0).to(tl.float32)

    _, d_out, _, d_hidden, _, d_out_b, _, d_hidden_b, _ = _output_rows(
        k, v, normed, scale, mask, k_b, v_b, normed_b, scale_b, mask_b, lr, rstd, D, BE)
    # rows of (G, C, L, D) tensors: chunk first + crow, row lrow
    dh_base = dh_ptr + first * L * D
    ko_base = ko_ptr + first * L * D
    rows_at = (crow * L + lrow) * D
    _store_write_rows(dh_base, ko_base, rows_at, cols, mask, d_hidden, k, DTYPE, COPY_KEYS)
    share = tl.where(mask, d_out * normed, 0.0)
    share_b = share
    if BE > 0:
        _store_write_rows(dh_base, ko_base, rows_at, cols_b, mask_b, d_hidden_b, k_b, DTYPE,
                          COPY_KEYS)
        share_b = tl.where(mask_b, d_out_b * normed_b, 0.0)
    return share, share_b


@triton.jit
def _store_write_rows(dh_base, ko_base, rows_at, cols, mask, d_hidden, k, DTYPE: tl.constexpr,
                      COPY_KEYS: tl.constexpr):
    """Dh and (COPY_KEYS) the keys in DTYPE at one column block of (G, C, L, D)
    rows (``rows_at``: their offsets from the bases)."""
    tile = rows_at[:, None] + cols[None, :]
    tl.store(dh_base + tile, d_hidden.to(DTYPE), mask=mask)
    if COPY_KEYS:
        tl.store(ko_base + tile, k.to(DTYPE), mask=mask)


@triton.jit
def _store_flat_dg(dg_ptr, share, crow, first, c0, rb, slots, U, L, D, loss_scale, cols, cmask,
                   BM: tl.constexpr):
    """A flat rows block's shares of d loss / d g at one column block: the
    chunk c0 of its first row, and the next if the block reaches it."""
    in_first = crow == c0
    dg = tl.sum(tl.where(in_first[:, None], share, 0.0), axis=0) * loss_scale
    tl.store(dg_ptr + ((first + c0) * slots + (rb - c0 * L // BM)) * D + cols, dg, mask=cmask)
    dg = tl.sum(tl.where(in_first[:, None], 0.0, share), axis=0) * loss_scale
    tl.store(dg_ptr + (first + c0 + 1) * slots * D + cols, dg,
             mask=cmask & ((c0 + 1) * L < (rb + 1) * BM) & (c0 + 1 < U))


@triton.jit
def grads_rows_kernel(k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, dh_ptr, dg_ptr, ko_ptr,
                      C, U, L, D, HID, row_blocks, slots,
                      sk_g, sk_b, sk_c, sk_l, sk_d,
                      sv_g, sv_b, sv_c, sv_l, sv_d,
                      slr_g, slr_b, slr_c, slr_l,
                      s1_g, s1_d, s1_k,
                      s2_g, s2_k, s2_d,
                      sg_g, sg_d,
                      loss_scale, eps,
                      BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                      DTYPE: tl.constexpr, PREC: tl.constexpr, COPY_KEYS: tl.constexpr,
                      FLAT: tl.constexpr, ITERS: tl.constexpr = 1, GELU_TANH: tl.constexpr = False,
                      BE: tl.constexpr = 0):
    """Pass 1 of a chunk's gradient, per block of BM rows: the forward at the
    shared weights, the LayerNorm backward, and

    * ``dh`` (G, C, L, D) in DTYPE (pass 2's operand dtype, so pass 2 reads
      it as is): d loss / d (act @ w2) WITHOUT the constant
      ``loss_scale`` (= 2 / d), which pass 2 applies to its float32 sums: it
      keeps small-step products further above float16's subnormal range;
    * ``dg`` (G * C, slots, D): this block's shares of d loss / d g, one
      slot per block that meets a chunk (summed by the caller over the slots,
      zeros where none wrote: a fixed order, so deterministic);
    * COPY_KEYS: ``ko`` (G, C, L, D), the keys in DTYPE, which pass 2 then
      reads at half the bytes of float32 keys, once per hidden block.

    The rows share the weights, so a block need not stay in one chunk: FLAT
    (BM <= L) walks each image's U L rows in blocks that may meet two
    chunks, where a block per chunk would pad each chunk to whole blocks
    (196 rows to 256 in 64-row blocks); else one chunk's rows per block.
    BE > 0: the columns in two blocks (``_columns``).
    """
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        rb = pid % row_blocks
        if FLAT:
            image = pid // row_blocks  # gi * B + bi, B = C // U images per group
            gi = (image // (C // U)).to(tl.int64)
            bi = (image % (C // U)).to(tl.int64)
            flat = rb * BM + tl.arange(0, BM)  # among the image's U L rows
            rmask = flat < U * L
            crow = flat // L  # each row's chunk after `first`, and its row in it
            lrow = flat - crow * L
            first = image.to(tl.int64) * U  # the image's first chunk, within all G C
            ci = first * 0  # the loads' chunk offset: in crow
        else:
            chunk = pid // row_blocks
            gi, c, bi, ci = _chunk_of(chunk, C, U)
            lrow = rb * BM + tl.arange(0, BM)
            rmask = lrow < L
            crow = lrow * 0
            first = chunk.to(tl.int64)
        share, share_b = _write_rows(k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, dh_ptr, ko_ptr,
                                     gi, bi, ci, crow, lrow, rmask, first, L, D, HID,
                                     sk_g, sk_b, sk_c, sk_l, sk_d, sv_g, sv_b, sv_c, sv_l, sv_d,
                                     slr_g, slr_b, slr_c, slr_l, s1_g, s1_d, s1_k, s2_g, s2_k,
                                     s2_d, sg_g, sg_d, eps, BM, BD, BE, BH, DTYPE, PREC,
                                     COPY_KEYS, GELU_TANH)
        cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
        if FLAT:
            # slot: the block's place among those that meet the chunk
            c0 = rb * BM // L
            _store_flat_dg(dg_ptr, share, crow, first, c0, rb, slots, U, L, D, loss_scale, cols,
                           cmask, BM)
            if BE > 0:
                _store_flat_dg(dg_ptr, share_b, crow, first, c0, rb, slots, U, L, D, loss_scale,
                               cols_b, cmask_b, BM)
        else:
            at = dg_ptr + (chunk.to(tl.int64) * slots + rb) * D
            tl.store(at + cols, tl.sum(share, axis=0) * loss_scale, mask=cmask)
            if BE > 0:
                tl.store(at + cols_b, tl.sum(share_b, axis=0) * loss_scale, mask=cmask_b)


@triton.jit
def grads_cols_kernel(k_ptr, dh_ptr, w1_ptr, w2_ptr, g1_ptr, g2_ptr,
                      C, U, L, D, HID, hidden_blocks,
                      sk_g, sk_b, sk_c, sk_l, sk_d,
                      s1_g, s1_d, s1_k,
                      s2_g, s2_k, s2_d,
                      loss_scale,
                      BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                      DTYPE: tl.constexpr, PREC: tl.constexpr, TAIL: tl.constexpr,
                      ITERS: tl.constexpr = 1, GELU_TANH: tl.constexpr = False,
                      BE: tl.constexpr = 0):
    """Pass 2, per (chunk, block of BH hidden units j): that block's slices
    of the chunk's G1 and G2 (``_write_cols``)."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        chunk, hid, hmask = _hidden_block(pid, hidden_blocks, HID, BH)
        gi, c, bi, ci = _chunk_of(chunk, C, U)
        _write_cols(k_ptr + (gi * sk_g + bi * sk_b + ci * sk_c), dh_ptr, w1_ptr + gi * s1_g,
                    w2_ptr + gi * s2_g, g1_ptr, g2_ptr, chunk.to(tl.int64), sk_l, sk_d, s1_d, s1_k,
                    s2_k, s2_d, hid, hmask, L, D, HID, loss_scale, BM, BD, BE, BH,
                    DTYPE, PREC, TAIL, GELU_TANH)


@triton.jit
def _weight_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols, cmask, hid, hmask):
    """w1[cols, hid] and w2[hid, cols]^T, (cols, BH) tiles as stored."""
    wmask = cmask[:, None] & hmask[None, :]
    w1 = tl.load(w1_ptr + (cols[:, None] * s1_d + hid[None, :] * s1_k), mask=wmask, other=0.0)
    w2t = tl.load(w2_ptr + (hid[None, :] * s2_k + cols[:, None] * s2_d), mask=wmask, other=0.0)
    return w1, w2t


@triton.jit
def _store_weight_grads(g1_ptr, g2_ptr, out, acc1, acc2, scale, D, HID, cols, cmask, hid,
                        hmask):
    """One column block of a (D, HID) and a (HID, D) weight gradient from ``out``."""
    tl.store(g1_ptr + out + (cols[:, None] * HID + hid[None, :]), acc1 * scale,
             mask=cmask[:, None] & hmask[None, :])
    tl.store(g2_ptr + out + (hid[:, None] * D + cols[None, :]), acc2 * scale,
             mask=hmask[:, None] & cmask[None, :])


@triton.jit
def _write_cols(k_base, dh_ptr, w1_ptr, w2_ptr, g1_ptr, g2_ptr, chunk, sk_l, sk_d, s1_d, s1_k,
                s2_k, s2_d, hid, hmask, L, D, HID, loss_scale, BM: tl.constexpr,
                BD: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr, DTYPE: tl.constexpr,
                PREC: tl.constexpr, TAIL: tl.constexpr, GELU_TANH: tl.constexpr):
    """A chunk's (``k_base``: its keys) slices of G1 and G2 at the hidden
    units ``hid``: walks its rows (BM at a time, the rest TAIL at a time),
    recomputes pre_j = k @ w1[:, j] (cheaper than storing a (T, 4d) tensor),
    accumulates in float32 registers and stores

        G1[:, j] = k^T (gelu'(pre_j) * (dh @ w2[j]^T)),   G2[j] = gelu(pre_j)^T dh.
    """
    cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
    w1, w2t = _weight_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols, cmask, hid, hmask)
    w1 = w1.to(DTYPE)
    w2t = w2t.to(DTYPE)
    acc1 = tl.zeros((BD, BH), dtype=tl.float32)
    acc2 = tl.zeros((BH, BD), dtype=tl.float32)
    w1_b = w1
    w2t_b = w2t
    acc1_b = acc1
    acc2_b = acc2
    if BE > 0:
        w1_b, w2t_b = _weight_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols_b, cmask_b, hid,
                                    hmask)
        w1_b = w1_b.to(DTYPE)
        w2t_b = w2t_b.to(DTYPE)
        acc1_b = tl.zeros((BE, BH), dtype=tl.float32)
        acc2_b = tl.zeros((BH, BE), dtype=tl.float32)
    dh_base = dh_ptr + chunk * L * D
    whole = L // BM * BM if TAIL < BM else L
    for r0 in range(0, whole, BM):
        acc1, acc2, acc1_b, acc2_b = _cols_rows(
            k_base, dh_base, sk_l, sk_d, r0, 0, L, L, D, cols, cmask, cols_b, cmask_b, w1, w2t,
            w1, w2t, w1_b, w2t_b, w1_b, w2t_b, 1.0, acc1, acc2, acc1_b, acc2_b, BM, BE, DTYPE,
            PREC, False, PREC, GELU_TANH)
    if TAIL < BM:  # the rows past the whole blocks, TAIL at a time: 196 take 208, not 256
        for r0 in range(whole, L, TAIL):
            acc1, acc2, acc1_b, acc2_b = _cols_rows(
                k_base, dh_base, sk_l, sk_d, r0, 0, L, L, D, cols, cmask, cols_b, cmask_b, w1,
                w2t, w1, w2t, w1_b, w2t_b, w1_b, w2t_b, 1.0, acc1, acc2, acc1_b, acc2_b, TAIL, BE,
                DTYPE, PREC, False, PREC, GELU_TANH)

    out = chunk * D * HID
    _store_weight_grads(g1_ptr, g2_ptr, out, acc1, acc2, loss_scale, D, HID, cols, cmask, hid,
                        hmask)
    if BE > 0:
        _store_weight_grads(g1_ptr, g2_ptr, out, acc1_b, acc2_b, loss_scale, D, HID, cols_b,
                            cmask_b, hid, hmask)


@triton.jit
def grads_chunk_kernel(k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, dh_ptr, dg_ptr, ko_ptr,
                       g1_ptr, g2_ptr,
                       C, U, L, D, HID,
                       sk_g, sk_b, sk_c, sk_l, sk_d,
                       sv_g, sv_b, sv_c, sv_l, sv_d,
                       slr_g, slr_b, slr_c, slr_l,
                       sko_g, sko_b, sko_c, sko_l, sko_d,
                       s1_g, s1_d, s1_k,
                       s2_g, s2_k, s2_d,
                       sg_g, sg_d,
                       loss_scale, eps,
                       BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                       DTYPE: tl.constexpr, PREC: tl.constexpr, COPY_KEYS: tl.constexpr,
                       TAIL: tl.constexpr, ITERS: tl.constexpr = 1,
                       GELU_TANH: tl.constexpr = False, BE: tl.constexpr = 0):
    """Both passes of a chunk's gradient in one program per chunk:
    ``grads_rows_kernel``'s chain over the chunk's rows (BM at a time, the
    rest TAIL at a time), its Dh and 16-bit keys stored for this program
    alone to read back (a chunk's are about 100 KB: L2 may keep them), then
    ``grads_cols_kernel``'s products for each block of BH hidden units in
    turn. ``dg`` (G * C, D) is the chunk's own sum: no per-block shares."""
    for it in range(ITERS):
        chunk = tl.program_id(0) * ITERS + it
        gi, c, bi, ci = _chunk_of(chunk, C, U)
        first = chunk.to(tl.int64)
        cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
        dg = tl.zeros((BD, ), dtype=tl.float32)
        dg_b = dg
        if BE > 0:
            dg_b = tl.zeros((BE, ), dtype=tl.float32)
        whole = L // BM * BM if TAIL < BM else L
        for r0 in range(0, whole, BM):
            lrow = r0 + tl.arange(0, BM)
            share, share_b = _write_rows(
                k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, dh_ptr, ko_ptr, gi, bi, ci, lrow * 0,
                lrow, lrow < L, first, L, D, HID, sk_g, sk_b, sk_c, sk_l, sk_d, sv_g, sv_b, sv_c,
                sv_l, sv_d, slr_g, slr_b, slr_c, slr_l, s1_g, s1_d, s1_k, s2_g, s2_k, s2_d, sg_g,
                sg_d, eps, BM, BD, BE, BH, DTYPE, PREC, COPY_KEYS, GELU_TANH)
            dg += tl.sum(share, axis=0)
            if BE > 0:
                dg_b += tl.sum(share_b, axis=0)
        if TAIL < BM:
            for r0 in range(whole, L, TAIL):
                lrow = r0 + tl.arange(0, TAIL)
                share, share_b = _write_rows(
                    k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, dh_ptr, ko_ptr, gi, bi, ci,
                    lrow * 0, lrow, lrow < L, first, L, D, HID, sk_g, sk_b, sk_c, sk_l, sk_d,
                    sv_g, sv_b, sv_c, sv_l, sv_d, slr_g, slr_b, slr_c, slr_l, s1_g, s1_d, s1_k,
                    s2_g, s2_k, s2_d, sg_g, sg_d, eps, TAIL, BD, BE, BH, DTYPE, PREC, COPY_KEYS,
                    GELU_TANH)
                dg += tl.sum(share, axis=0)
                if BE > 0:
                    dg_b += tl.sum(share_b, axis=0)
        tl.store(dg_ptr + first * D + cols, dg * loss_scale, mask=cmask)
        if BE > 0:
            tl.store(dg_ptr + first * D + cols_b, dg_b * loss_scale, mask=cmask_b)
        # the chunk's Dh and keys, stored by all of this program's threads, are read back
        tl.debug_barrier()
        k_base = ko_ptr + (gi * sko_g + bi * sko_b + ci * sko_c)
        for h0 in range(0, HID, BH):
            hid = h0 + tl.arange(0, BH)
            _write_cols(k_base, dh_ptr, w1_ptr + gi * s1_g, w2_ptr + gi * s2_g, g1_ptr, g2_ptr,
                        first, sko_l, sko_d, s1_d, s1_k, s2_k, s2_d, hid,
                        hid < HID, L, D, HID, loss_scale, BM, BD, BE, BH, DTYPE, PREC, TAIL,
                        GELU_TANH)
        # the next chunk's rows overwrite nothing this one reads: no second barrier


@triton.jit
def read_backward_rows_kernel(x_ptr, go_ptr, w1_ptr, w2_ptr, g_ptr, gx_ptr, dy_ptr, dg_ptr,
                              b1_ptr, b2_ptr, carry_ptr,
                              B, C, N, L, D, HID, row_blocks, r0, slot0, slots,
                              sx_h, sx_b, sx_n, sx_d,
                              s1_h, s1_b, s1_c, s1_d, s1_k,
                              s2_h, s2_b, s2_c, s2_k, s2_d,
                              sg_h, sg_b, sg_c, sg_d,
                              so_h, so_b, so_n, so_d,
                              sgx_h, sgx_b, sgx_n, sgx_d,
                              sb1_h, sb1_d, sb1_k,
                              sb2_h, sb2_k, sb2_d,
                              sc_h, sc_b, sc_c,
                              eps,
                              BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                              DTYPE: tl.constexpr, PREC: tl.constexpr,
                              DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr,
                              ITERS: tl.constexpr = 1, GELU_TANH: tl.constexpr = False,
                              BE: tl.constexpr = 0):
    """The read's backward, per block of BM rows (``read_kernel``'s programs):
    from ``go`` = d loss / d out it recomputes the MLP's output Y and N = LN(Y)
    (nothing was saved), and writes

    * ``gx`` = go + (gelu'(P) * (dY @ w2^T)) @ w1^T, P = x @ w1, walking the
      hidden blocks again, with dY = LNback(go * (1 + g)) in float32;
    * ``dy`` (H, B, C, L, D): dY in DTYPE, for the weights' pass
      (``read_backward_cols_kernel``), which multiplies it in DTYPE;
    * ``dg`` (H * B * C, slots, D): this block's share of sum(go * N), at
      slot ``slot0`` + its block (the blocks from row ``r0`` of each chunk).

    BE > 0: the columns in two blocks (``_columns``)."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        rb = pid % row_blocks
        group = pid // row_blocks
        c, h, b, c64 = _state_of(group, B, C)

        rows = r0 + rb * BM + tl.arange(0, BM)
        rmask = (rows < L) & (c * L + rows < N)
        cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
        hcols = tl.arange(0, BH)
        mask = rmask[:, None] & cmask[None, :]
        mask_b = rmask[:, None] & cmask_b[None, :]
        first = c64 * L

        x_base = x_ptr + (h * sx_h + b * sx_b + first * sx_n)
        go_base = go_ptr + (h * so_h + b * so_b + first * so_n)
        g_base = g_ptr + (h * sg_h + b * sg_b + c64 * sg_c)
        x = _load_tile(x_base, rows, sx_n, cols, sx_d, mask)
        go = _load_tile(go_base, rows, so_n, cols, so_d, mask)
        scale = 1.0 + tl.load(g_base + cols * sg_d, mask=cmask, other=0.0).to(tl.float32)
        x_b = x
        go_b = go
        scale_b = scale
        if BE > 0:
            x_b = _load_tile(x_base, rows, sx_n, cols_b, sx_d, mask_b)
            go_b = _load_tile(go_base, rows, so_n, cols_b, so_d, mask_b)
            scale_b = 1.0 + tl.load(g_base + cols_b * sg_d, mask=cmask_b,
                                    other=0.0).to(tl.float32)
        carry = 1.0
        if DECOMPOSED:
            carry = tl.load(carry_ptr + (h * sc_h + b * sc_b + c64 * sc_c)).to(tl.float32)
        w1_base = w1_ptr + (h * s1_h + b * s1_b + c64 * s1_c)
        w2_base = w2_ptr + (h * s2_h + b * s2_b + c64 * s2_c)
        b1_base = b1_ptr + h * sb1_h
        b2_base = b2_ptr + h * sb2_h
        y, y_b = _mlp_rows(x, x_b, w1_base, w2_base, s1_d, s1_k, s2_k, s2_d, b1_base, b2_base,
                           sb1_d, sb1_k, sb2_k, sb2_d, carry, D, HID, BM, BD, BE, BH, DTYPE, PREC,
                           DECOMPOSED, BASE_PREC, GELU_TANH)
        normed, normed_b, rstd = _layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE)
        dg_at = dg_ptr + (group.to(tl.int64) * slots + slot0 + rb) * D
        tl.store(dg_at + cols, tl.sum(go * normed, axis=0), mask=cmask)
        dy, dy_b, _ = _ln_backward_rows(go * scale[None, :], normed, go_b * scale_b[None, :],
                                        normed_b, rstd, D, BE)
        dy = tl.where(mask, dy, 0.0)
        dyo = dy.to(DTYPE)
        dy_base = dy_ptr + group.to(tl.int64) * L * D
        tl.store(dy_base + (rows[:, None] * D + cols[None, :]), dyo, mask=mask)
        dyo_b = dyo
        if BE > 0:
            tl.store(dg_at + cols_b, tl.sum(go_b * normed_b, axis=0), mask=cmask_b)
            dy_b = tl.where(mask_b, dy_b, 0.0)
            dyo_b = dy_b.to(DTYPE)
            tl.store(dy_base + (rows[:, None] * D + cols_b[None, :]), dyo_b, mask=mask_b)

        xo = x.to(DTYPE)
        xo_b = xo
        if BE > 0:
            xo_b = x_b.to(DTYPE)
        gx = go
        gx_b = go_b
        for h0 in range(0, HID, BH):
            hid = h0 + hcols
            pre = _pre_block(x, xo, w1_base, s1_d, s1_k, b1_base, sb1_d, sb1_k, carry, cols, cmask,
                             hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
            back = _times_w2t(dy, dyo, w2_base, s2_k, s2_d, b2_base, sb2_k, sb2_d, carry, cols,
                              cmask, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
            if BE > 0:
                pre += _pre_block(x_b, xo_b, w1_base, s1_d, s1_k, b1_base, sb1_d, sb1_k, carry,
                                  cols_b, cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
                back += _times_w2t(dy_b, dyo_b, w2_base, s2_k, s2_d, b2_base, sb2_k, sb2_d,
                                   carry, cols_b, cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED,
                                   BASE_PREC)
            d_pre = back * _gelu_grad(pre, GELU_TANH)
            gx += _times_w1t(d_pre, w1_base, s1_d, s1_k, b1_base, sb1_d, sb1_k, carry, cols,
                             cmask, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
            if BE > 0:
                gx_b += _times_w1t(d_pre, w1_base, s1_d, s1_k, b1_base, sb1_d, sb1_k, carry,
                                   cols_b, cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        gx_base = gx_ptr + (h * sgx_h + b * sgx_b + first * sgx_n)
        tl.store(gx_base + (rows[:, None] * sgx_n + cols[None, :] * sgx_d), gx, mask=mask)
        if BE > 0:
            tl.store(gx_base + (rows[:, None] * sgx_n + cols_b[None, :] * sgx_d), gx_b,
                     mask=mask_b)


@triton.jit
def _cols_rows(x_base, dy_base, sx_n, sx_d, r0, c, L, N, D, cols, cmask, cols_b, cmask_b, w1,
               w2t, b1, b2t, w1_b, w2t_b, b1_b, b2t_b, carry, acc1, acc2, acc1_b, acc2_b,
               ROWS: tl.constexpr, BE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
               DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr, GELU_TANH: tl.constexpr):
    """``_cols_step`` over ROWS rows of chunk c (of N tokens) from row ``r0``:
    its inputs x (a read's tokens, a write's keys; strided) and the gradient
    at the MLP's output ((L, D) rows), both column blocks."""
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
    if DECOMPOSED:  # W_0's products take float32 operands
        return _cols_step(x.to(tl.float32), x.to(DTYPE), dyo.to(tl.float32), dyo, w1, w2t, b1,
                          b2t, x_b.to(tl.float32), x_b.to(DTYPE), dyo_b.to(tl.float32), dyo_b,
                          w1_b, w2t_b, b1_b, b2t_b, carry, acc1, acc2, acc1_b, acc2_b, BE, DTYPE,
                          PREC, True, BASE_PREC, GELU_TANH)
    xo = x.to(DTYPE)
    xo_b = x_b.to(DTYPE)
    return _cols_step(xo, xo, dyo, dyo, w1, w2t, w1, w2t, xo_b, xo_b, dyo_b, dyo_b, w1_b, w2t_b,
                      w1_b, w2t_b, 1.0, acc1, acc2, acc1_b, acc2_b, BE, DTYPE, PREC, False, PREC,
                      GELU_TANH)


@triton.jit
def read_backward_cols_kernel(x_ptr, dy_ptr, w1_ptr, w2_ptr, gw1_ptr, gw2_ptr,
                              b1_ptr, b2_ptr, carry_ptr,
                              B, C, N, L, D, HID, hidden_blocks,
                              sx_h, sx_b, sx_n, sx_d,
                              s1_h, s1_b, s1_c, s1_d, s1_k,
                              s2_h, s2_b, s2_c, s2_k, s2_d,
                              sb1_h, sb1_d, sb1_k,
                              sb2_h, sb2_k, sb2_d,
                              sc_h, sc_b, sc_c,
                              BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                              DTYPE: tl.constexpr, PREC: tl.constexpr,
                              DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr,
                              TAIL: tl.constexpr, ITERS: tl.constexpr = 1,
                              GELU_TANH: tl.constexpr = False, BE: tl.constexpr = 0):
    """The read's weight gradients, per (state (h, b, c), block of BH hidden
    units j): walks the chunk's rows as ``grads_cols_kernel`` does (the same
    ``_cols_step``) and writes gw1[:, j] = x^T (gelu'(P_j) * (dY @ w2[j]^T))
    and gw2[j] = gelu(P_j)^T dY, (H, B, C, D, HID) and (H, B, C, HID, D);
    with DECOMPOSED, the gradients of dW (equal to those of W)."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        group, hid, hmask = _hidden_block(pid, hidden_blocks, HID, BH)
        cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
        c, h, b, c64 = _state_of(group, B, C)
        w1_base = w1_ptr + (h * s1_h + b * s1_b + c64 * s1_c)
        w2_base = w2_ptr + (h * s2_h + b * s2_b + c64 * s2_c)
        w1, w2t = _weight_tiles(w1_base, s1_d, s1_k, w2_base, s2_k, s2_d, cols, cmask, hid,
                                hmask)
        w1 = w1.to(DTYPE)
        w2t = w2t.to(DTYPE)
        carry = 1.0
        b1 = w1
        b2t = w2t
        if DECOMPOSED:
            carry = tl.load(carry_ptr + (h * sc_h + b * sc_b + c64 * sc_c)).to(tl.float32)
            b1, b2t = _weight_tiles(b1_ptr + h * sb1_h, sb1_d, sb1_k, b2_ptr + h * sb2_h, sb2_k,
                                    sb2_d, cols, cmask, hid, hmask)
            b1 = b1.to(tl.float32)
            b2t = b2t.to(tl.float32)
        acc1 = tl.zeros((BD, BH), dtype=tl.float32)
        acc2 = tl.zeros((BH, BD), dtype=tl.float32)
        w1_b = w1
        w2t_b = w2t
        b1_b = b1
        b2t_b = b2t
        acc1_b = acc1
        acc2_b = acc2
        if BE > 0:
            w1_b, w2t_b = _weight_tiles(w1_base, s1_d, s1_k, w2_base, s2_k, s2_d, cols_b, cmask_b,
                                        hid, hmask)
            w1_b = w1_b.to(DTYPE)
            w2t_b = w2t_b.to(DTYPE)
            b1_b = w1_b
            b2t_b = w2t_b
            if DECOMPOSED:
                b1_b, b2t_b = _weight_tiles(b1_ptr + h * sb1_h, sb1_d, sb1_k, b2_ptr + h * sb2_h,
                                            sb2_k, sb2_d, cols_b, cmask_b, hid, hmask)
                b1_b = b1_b.to(tl.float32)
                b2t_b = b2t_b.to(tl.float32)
            acc1_b = tl.zeros((BE, BH), dtype=tl.float32)
            acc2_b = tl.zeros((BH, BE), dtype=tl.float32)

        x_base = x_ptr + (h * sx_h + b * sx_b + c64 * L * sx_n)
        dy_base = dy_ptr + group.to(tl.int64) * L * D
        whole = L // BM * BM if TAIL < BM else L
        for r0 in range(0, whole, BM):
            acc1, acc2, acc1_b, acc2_b = _cols_rows(
                x_base, dy_base, sx_n, sx_d, r0, c, L, N, D, cols, cmask, cols_b, cmask_b, w1,
                w2t, b1, b2t, w1_b, w2t_b, b1_b, b2t_b, carry, acc1, acc2, acc1_b, acc2_b, BM, BE,
                DTYPE, PREC, DECOMPOSED, BASE_PREC, GELU_TANH)
        if TAIL < BM:  # as grads_cols_kernel's
            for r0 in range(whole, L, TAIL):
                acc1, acc2, acc1_b, acc2_b = _cols_rows(
                    x_base, dy_base, sx_n, sx_d, r0, c, L, N, D, cols, cmask, cols_b, cmask_b, w1,
                    w2t, b1, b2t, w1_b, w2t_b, b1_b, b2t_b, carry, acc1, acc2, acc1_b, acc2_b,
                    TAIL, BE, DTYPE, PREC, DECOMPOSED, BASE_PREC, GELU_TANH)

        out = group.to(tl.int64) * D * HID
        _store_weight_grads(gw1_ptr, gw2_ptr, out, acc1, acc2, 1.0, D, HID, cols, cmask, hid,
                            hmask)
        if BE > 0:
            _store_weight_grads(gw1_ptr, gw2_ptr, out, acc1_b, acc2_b, 1.0, D, HID, cols_b,
                                cmask_b, hid, hmask)


@triton.jit
def _times_w2(a, w_ptr, s_k, s_d, cols, cmask, hid, HID, DTYPE: tl.constexpr,
              PREC: tl.constexpr):
    """a @ w[hid, cols], (BM, BH) float32 -> (BM, cols): a hidden block's share of
    a product with a (HID, D) matrix."""
    mask = (hid < HID)[:, None] & cmask[None, :]
    w = tl.load(w_ptr + hid[:, None] * s_k + cols[None, :] * s_d, mask=mask, other=0.0)
    return tl.dot(a.to(DTYPE), w.to(DTYPE), input_precision=PREC)


@triton.jit
def _gelu_second(x, GELU_TANH: tl.constexpr):
    if GELU_TANH:  # 2 s (1 - s) (2 u' + 2 x (1 - 2 s) u'^2 + x u''), u'' = 6 c a x
        s, du = _tanh_form(x)
        return s * (1.0 - s) * 2.0 * (du * 2.0 + x * (1.0 - s * 2.0) * du * du * 2.0 +
                                      x * x * SQRT_2_PI * GELU_CUBIC * 6.0)
    # gelu''(x) = phi(x) (2 - x^2)
    return tl.exp(-0.5 * x * x) * INV_SQRT_2PI * (2.0 - x * x)


@triton.jit
def _write_backward_inputs(k_base, v_base, rows, sk_l, sk_d, sv_l, sv_d, g_base, sg_d, bg_base,
                           sbg_d, cols, cmask, mask):
    """A chunk-gradient backward block's keys, values, gain 1 + g and g's
    cotangent at one column block."""
    k = _load_tile(k_base, rows, sk_l, cols, sk_d, mask)
    v = _load_tile(v_base, rows, sv_l, cols, sv_d, mask)
    scale = 1.0 + tl.load(g_base + cols * sg_d, mask=cmask, other=0.0).to(tl.float32)
    bar_g = tl.load(bg_base + cols * sbg_d, mask=cmask, other=0.0).to(tl.float32)
    return k, v, scale, bar_g


@triton.jit
def _cotangent_rows(bar_dn, bar_dh, d_out, d_normed, normed, scale, bar_g, coef, mask, rstd,
                    ln_y, ln_bar, gk):
    """The (rows, D) chain back from Dh = LNback(D s), D = R c, R = K + N s - V
    and the output sum D N, one column block: the cotangents at s (per row),
    at D, at N, at R, and gk plus R's."""
    bar_scale = bar_dn * d_out
    bar_d = bar_dn * scale[None, :] + bar_g[None, :] * normed
    bar_normed = (-rstd * ln_y)[:, None] * bar_dh + (-rstd * ln_bar)[:, None] * d_normed
    bar_normed += bar_g[None, :] * d_out
    bar_resid = tl.where(mask, bar_d * coef[:, None], 0.0)
    bar_normed += bar_resid * scale[None, :]
    bar_scale += bar_resid * normed
    return bar_scale, bar_d, bar_normed, bar_resid, gk + bar_resid


@triton.jit
def _store_cotangent_rows(bh_ptr, gv_ptr, gs_ptr, at, slot, D, rows, cols, cmask, mask, bar_h,
                          normed, rstd_term, bar_resid, bar_scale, DTYPE: tl.constexpr):
    """Stores one column block of the cotangent at the MLP's output (in
    DTYPE, returned), of the values' gradient and of g's share."""
    bar_h = tl.where(mask, bar_h - rstd_term[:, None] * normed, 0.0)
    bho = bar_h.to(DTYPE)
    tile = rows[:, None] * D + cols[None, :]
    tl.store(bh_ptr + at + tile, bho, mask=mask)
    tl.store(gv_ptr + at + tile, -bar_resid, mask=mask)
    tl.store(gs_ptr + slot * D + cols, tl.sum(tl.where(mask, bar_scale, 0.0), axis=0),
             mask=cmask)
    return bar_h, bho


@triton.jit
def _write_backward_rows(k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, bw1_ptr, bw2_ptr, bg_ptr,
                         gk_ptr, gv_ptr, glr_ptr, gs_ptr, dh_ptr, bh_ptr, ko_ptr,
                         gi, c, bi, ci, chunk, r0, slot, L, D, HID,
                         sk_g, sk_b, sk_c, sk_l, sk_d, sv_g, sv_b, sv_c, sv_l, sv_d,
                         slr_g, slr_b, slr_c, slr_l, s1_g, s1_d, s1_k, s2_g, s2_k, s2_d,
                         sg_g, sg_d, sb1_g, sb1_c, sb1_d, sb1_k, sb2_g, sb2_c, sb2_k, sb2_d,
                         sbg_g, sbg_c, sbg_d, eps,
                         BM: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                         BH: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
                         COPY_KEYS: tl.constexpr, GELU_TANH: tl.constexpr):
    """``grads_backward_rows_kernel``'s work on the BM rows from row ``r0`` of
    chunk ``chunk`` (int64; chunk c of group gi, image bi's chunk ci): stores
    their gradients, their share of g's at ``gs``'s row ``slot``, Dh, the
    cotangent at the MLP's output and (COPY_KEYS) the 16-bit keys; both
    column blocks (``_columns``)."""
    rows = r0 + tl.arange(0, BM)
    rmask = rows < L
    cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
    hcols = tl.arange(0, BH)
    mask = rmask[:, None] & cmask[None, :]
    mask_b = rmask[:, None] & cmask_b[None, :]
    out_rows = chunk * L * D

    k_base = k_ptr + (gi * sk_g + bi * sk_b + ci * sk_c)
    v_base = v_ptr + (gi * sv_g + bi * sv_b + ci * sv_c)
    g_base = g_ptr + gi * sg_g
    bg_base = bg_ptr + gi * sbg_g + c * sbg_c
    k, v, scale, bar_g = _write_backward_inputs(k_base, v_base, rows, sk_l, sk_d, sv_l, sv_d,
                                                g_base, sg_d, bg_base, sbg_d, cols, cmask, mask)
    k_b = k
    v_b = v
    scale_b = scale
    bar_g_b = bar_g
    if BE > 0:
        k_b, v_b, scale_b, bar_g_b = _write_backward_inputs(
            k_base, v_base, rows, sk_l, sk_d, sv_l, sv_d, g_base, sg_d, bg_base, sbg_d, cols_b,
            cmask_b, mask_b)
    lr = tl.load(lr_ptr + (gi * slr_g + bi * slr_b + ci * slr_c) + rows * slr_l, mask=rmask,
                 other=0.0).to(tl.float32)
    w1 = w1_ptr + gi * s1_g
    w2 = w2_ptr + gi * s2_g
    bw1 = bw1_ptr + gi * sb1_g + c * sb1_c
    bw2 = bw2_ptr + gi * sb2_g + c * sb2_c

    # the forward chain, as grads_rows_kernel computes it
    y, y_b = _mlp_rows(k, k_b, w1, w2, s1_d, s1_k, s2_k, s2_d, w1, w2, 0, 0, 0, 0, 1.0, D, HID,
                       BM, BD, BE, BH, DTYPE, PREC, False, PREC, GELU_TANH)
    normed, normed_b, rstd = _layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE)
    coef = lr * (2.0 / D)
    (resid, d_out, d_normed, d_hidden, resid_b, d_out_b, d_normed_b, d_hidden_b,
     ln_y) = _output_rows(k, v, normed, scale, mask, k_b, v_b, normed_b, scale_b, mask_b, coef,
                          rstd, D, BE)
    dho = d_hidden.to(DTYPE)
    ko = k.to(DTYPE)
    _store_write_rows(dh_ptr + out_rows, ko_ptr + out_rows, rows * D, cols, mask, d_hidden, k,
                      DTYPE, COPY_KEYS)
    dho_b = dho
    ko_b = ko
    if BE > 0:
        dho_b = d_hidden_b.to(DTYPE)
        ko_b = k_b.to(DTYPE)
        _store_write_rows(dh_ptr + out_rows, ko_ptr + out_rows, rows * D, cols_b, mask_b,
                          d_hidden_b, k_b, DTYPE, COPY_KEYS)

    # through K^T Dp (Dp = gelu'(P) Dh w2^T) and A^T Dh: the cotangent at Dh
    gk = tl.zeros((BM, BD), dtype=tl.float32)
    bar_dh = tl.zeros((BM, BD), dtype=tl.float32)
    gk_b = gk
    bar_dh_b = bar_dh
    if BE > 0:
        gk_b = tl.zeros((BM, BE), dtype=tl.float32)
        bar_dh_b = tl.zeros((BM, BE), dtype=tl.float32)
    for h0 in range(0, HID, BH):
        hid = h0 + hcols
        pre = _pre_block(k, ko, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols, cmask, hid, HID, DTYPE,
                         PREC, False, PREC)
        back = _times_w2t(d_hidden, dho, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols, cmask, hid, HID,
                          DTYPE, PREC, False, PREC)
        bar_dp = _pre_block(k, ko, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols, cmask, hid, HID,
                            DTYPE, PREC, False, PREC)
        if BE > 0:
            pre += _pre_block(k_b, ko_b, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols_b, cmask_b, hid,
                              HID, DTYPE, PREC, False, PREC)
            back += _times_w2t(d_hidden_b, dho_b, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols_b, cmask_b,
                               hid, HID, DTYPE, PREC, False, PREC)
            bar_dp += _pre_block(k_b, ko_b, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols_b, cmask_b,
                                 hid, HID, DTYPE, PREC, False, PREC)
        grad = _gelu_grad(pre, GELU_TANH)
        act = _gelu(pre, GELU_TANH)
        gk += _times_w1t(grad * back, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols, cmask, hid, HID,
                         DTYPE, PREC, False, PREC)
        bar_dh += _times_w2(grad * bar_dp, w2, s2_k, s2_d, cols, cmask, hid, HID, DTYPE, PREC)
        bar_dh += _times_w2(act, bw2, sb2_k, sb2_d, cols, cmask, hid, HID, DTYPE, PREC)
        if BE > 0:
            gk_b += _times_w1t(grad * back, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols_b, cmask_b,
                               hid, HID, DTYPE, PREC, False, PREC)
            bar_dh_b += _times_w2(grad * bar_dp, w2, s2_k, s2_d, cols_b, cmask_b, hid, HID, DTYPE,
                                  PREC)
            bar_dh_b += _times_w2(act, bw2, sb2_k, sb2_d, cols_b, cmask_b, hid, HID, DTYPE, PREC)

    # the (rows, D) chain back to R, N and H; LNback is its own adjoint
    bar_dn, bar_dn_b, ln_bar = _ln_backward_rows(bar_dh, normed, bar_dh_b, normed_b, rstd, D, BE)
    rstd_term = rstd * _row_sum(bar_dh * d_hidden, bar_dh_b * d_hidden_b, BE) / D
    bar_scale, bar_d, bar_normed, bar_resid, gk = _cotangent_rows(
        bar_dn, bar_dh, d_out, d_normed, normed, scale, bar_g, coef, mask, rstd, ln_y, ln_bar, gk)
    bar_scale_b = bar_scale
    bar_d_b = bar_d
    bar_normed_b = bar_normed
    bar_resid_b = bar_resid
    if BE > 0:
        bar_scale_b, bar_d_b, bar_normed_b, bar_resid_b, gk_b = _cotangent_rows(
            bar_dn_b, bar_dh_b, d_out_b, d_normed_b, normed_b, scale_b, bar_g_b, coef, mask_b,
            rstd, ln_y, ln_bar, gk_b)
    bar_lr = _row_sum(bar_d * resid, bar_d_b * resid_b, BE) * (2.0 / D)
    tl.store(glr_ptr + chunk * L + rows, bar_lr, mask=rmask)
    bar_h, bar_h_b, _ = _ln_backward_rows(bar_normed, normed, bar_normed_b, normed_b, rstd, D, BE)
    bar_h, bho = _store_cotangent_rows(bh_ptr, gv_ptr, gs_ptr, out_rows, slot, D, rows, cols,
                                       cmask, mask, bar_h, normed, rstd_term, bar_resid,
                                       bar_scale, DTYPE)
    bho_b = bho
    if BE > 0:
        bar_h_b, bho_b = _store_cotangent_rows(bh_ptr, gv_ptr, gs_ptr, out_rows, slot, D, rows,
                                               cols_b, cmask_b, mask_b, bar_h_b, normed_b,
                                               rstd_term, bar_resid_b, bar_scale_b, DTYPE)

    # the cotangent at P: gelu'(P) (Dh bW2^T + bH w2^T) + gelu''(P) (Dh w2^T) (K bW1)
    for h0 in range(0, HID, BH):
        hid = h0 + hcols
        pre = _pre_block(k, ko, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols, cmask, hid, HID, DTYPE,
                         PREC, False, PREC)
        back = _times_w2t(d_hidden, dho, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols, cmask, hid, HID,
                          DTYPE, PREC, False, PREC)
        bar_dp = _pre_block(k, ko, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols, cmask, hid, HID,
                            DTYPE, PREC, False, PREC)
        bar_act = _times_w2t(d_hidden, dho, bw2, sb2_k, sb2_d, bw2, 0, 0, 1.0, cols, cmask, hid,
                             HID, DTYPE, PREC, False, PREC)
        bar_act += _times_w2t(bar_h, bho, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols, cmask, hid, HID,
                              DTYPE, PREC, False, PREC)
        if BE > 0:
            pre += _pre_block(k_b, ko_b, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols_b, cmask_b, hid,
                              HID, DTYPE, PREC, False, PREC)
            back += _times_w2t(d_hidden_b, dho_b, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols_b, cmask_b,
                               hid, HID, DTYPE, PREC, False, PREC)
            bar_dp += _pre_block(k_b, ko_b, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols_b, cmask_b,
                                 hid, HID, DTYPE, PREC, False, PREC)
            bar_act += _times_w2t(d_hidden_b, dho_b, bw2, sb2_k, sb2_d, bw2, 0, 0, 1.0, cols_b,
                                  cmask_b, hid, HID, DTYPE, PREC, False, PREC)
            bar_act += _times_w2t(bar_h_b, bho_b, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols_b, cmask_b,
                                  hid, HID, DTYPE, PREC, False, PREC)
        bar_pre = (_gelu_grad(pre, GELU_TANH) * bar_act +
                   _gelu_second(pre, GELU_TANH) * back * bar_dp)
        gk += _times_w1t(bar_pre, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols, cmask, hid, HID, DTYPE,
                         PREC, False, PREC)
        if BE > 0:
            gk_b += _times_w1t(bar_pre, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols_b, cmask_b, hid, HID,
                               DTYPE, PREC, False, PREC)
    tl.store(gk_ptr + out_rows + (rows[:, None] * D + cols[None, :]), gk, mask=mask)
    if BE > 0:
        tl.store(gk_ptr + out_rows + (rows[:, None] * D + cols_b[None, :]), gk_b, mask=mask_b)


@triton.jit
def grads_backward_rows_kernel(k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr,
                               bw1_ptr, bw2_ptr, bg_ptr,
                               gk_ptr, gv_ptr, glr_ptr, gs_ptr, dh_ptr, bh_ptr, ko_ptr,
                               C, U, L, D, HID, row_blocks,
                               sk_g, sk_b, sk_c, sk_l, sk_d,
                               sv_g, sv_b, sv_c, sv_l, sv_d,
                               slr_g, slr_b, slr_c, slr_l,
                               s1_g, s1_d, s1_k,
                               s2_g, s2_k, s2_d,
                               sg_g, sg_d,
                               sb1_g, sb1_c, sb1_d, sb1_k,
                               sb2_g, sb2_c, sb2_k, sb2_d,
                               sbg_g, sbg_c, sbg_d,
                               eps,
                               BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                               DTYPE: tl.constexpr, PREC: tl.constexpr,
                               COPY_KEYS: tl.constexpr, ITERS: tl.constexpr = 1,
                               GELU_TANH: tl.constexpr = False, BE: tl.constexpr = 0):
    """The chunk gradients' backward, per block of BM rows of a chunk: from
    the cotangents bW1, bW2, bg of the chunk's outputs (K^T Dp, A^T Dh,
    sum D N; notation of ``chunk_grads.closed_form``) it recomputes the chain
    (nothing was saved) and writes the gradients of the keys (``gk``), values
    (``gv``) and step sizes (``glr``) in the inputs' (G, C, L, ...) order,
    this block's share of g's gradient (``gs``, (G * C, row_blocks, D)), and
    for the weights' pass Dh (``dh``) and the gradient at the MLP's output
    (``bh``), both (G, C, L, D) in DTYPE, and with COPY_KEYS the keys in
    DTYPE (``ko``, as ``grads_rows_kernel``'s). Three walks over the hidden
    blocks: the forward (H), the cotangent at Dh, the cotangent at P."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        rb = pid % row_blocks
        chunk = pid // row_blocks
        gi, c, bi, ci = _chunk_of(chunk, C, U)

        _write_backward_rows(
            k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, bw1_ptr, bw2_ptr, bg_ptr, gk_ptr, gv_ptr,
            glr_ptr, gs_ptr, dh_ptr, bh_ptr, ko_ptr, gi, c, bi, ci, chunk.to(tl.int64), rb * BM,
            pid.to(tl.int64), L, D, HID, sk_g, sk_b, sk_c, sk_l, sk_d, sv_g, sv_b, sv_c, sv_l,
            sv_d, slr_g, slr_b, slr_c, slr_l, s1_g, s1_d, s1_k, s2_g, s2_k, s2_d, sg_g, sg_d,
            sb1_g, sb1_c, sb1_d, sb1_k, sb2_g, sb2_c, sb2_k, sb2_d, sbg_g, sbg_c, sbg_d, eps, BM,
            BD, BE, BH, DTYPE, PREC, COPY_KEYS, GELU_TANH)


@triton.jit
def _backward_cols_rows(k_base, dh_base, bh_base, sk_l, sk_d, r0, L, D, cols, cmask, cols_b,
                        cmask_b, w1, w2t, bw1, bw2t, w1_b, w2t_b, bw1_b, bw2t_b, acc1, acc2,
                        acc1_b, acc2_b, ROWS: tl.constexpr, BE: tl.constexpr,
                        DTYPE: tl.constexpr, PREC: tl.constexpr, GELU_TANH: tl.constexpr):
    """``grads_backward_cols_kernel``'s sums over ROWS rows of a chunk from
    row ``r0``, both column blocks."""
    rows = r0 + tl.arange(0, ROWS)
    mask = (rows < L)[:, None] & cmask[None, :]
    k = tl.load(k_base + (rows[:, None] * sk_l + cols[None, :] * sk_d), mask=mask,
                other=0.0).to(DTYPE)
    tile = rows[:, None] * D + cols[None, :]
    dh = tl.load(dh_base + tile, mask=mask, other=0.0)
    bh = tl.load(bh_base + tile, mask=mask, other=0.0)
    pre = tl.dot(k, w1, input_precision=PREC)
    back = tl.dot(dh, w2t, input_precision=PREC)
    bar_dp = tl.dot(k, bw1, input_precision=PREC)
    bar_act = tl.dot(dh, bw2t, input_precision=PREC)
    bar_act = tl.dot(bh, w2t, acc=bar_act, input_precision=PREC)
    k_b = k
    dh_b = dh
    bh_b = bh
    if BE > 0:
        mask_b = (rows < L)[:, None] & cmask_b[None, :]
        k_b = tl.load(k_base + (rows[:, None] * sk_l + cols_b[None, :] * sk_d), mask=mask_b,
                      other=0.0).to(DTYPE)
        tile_b = rows[:, None] * D + cols_b[None, :]
        dh_b = tl.load(dh_base + tile_b, mask=mask_b, other=0.0)
        bh_b = tl.load(bh_base + tile_b, mask=mask_b, other=0.0)
        pre = tl.dot(k_b, w1_b, acc=pre, input_precision=PREC)
        back = tl.dot(dh_b, w2t_b, acc=back, input_precision=PREC)
        bar_dp = tl.dot(k_b, bw1_b, acc=bar_dp, input_precision=PREC)
        bar_act = tl.dot(dh_b, bw2t_b, acc=bar_act, input_precision=PREC)
        bar_act = tl.dot(bh_b, w2t_b, acc=bar_act, input_precision=PREC)
    grad = _gelu_grad(pre, GELU_TANH)
    bar_pre = (grad * bar_act + _gelu_second(pre, GELU_TANH) * back * bar_dp).to(DTYPE)
    d_act = (grad * bar_dp).to(DTYPE)
    act = _gelu(pre, GELU_TANH).to(DTYPE)
    acc1 = tl.dot(tl.trans(k), bar_pre, acc=acc1, input_precision=PREC)
    acc2 = tl.dot(tl.trans(d_act), dh, acc=acc2, input_precision=PREC)
    acc2 = tl.dot(tl.trans(act), bh, acc=acc2, input_precision=PREC)
    if BE > 0:
        acc1_b = tl.dot(tl.trans(k_b), bar_pre, acc=acc1_b, input_precision=PREC)
        acc2_b = tl.dot(tl.trans(d_act), dh_b, acc=acc2_b, input_precision=PREC)
        acc2_b = tl.dot(tl.trans(act), bh_b, acc=acc2_b, input_precision=PREC)
    return acc1, acc2, acc1_b, acc2_b


@triton.jit
def grads_backward_cols_kernel(k_ptr, dh_ptr, bh_ptr, w1_ptr, w2_ptr, bw1_ptr, bw2_ptr,
                               gw1_ptr, gw2_ptr,
                               C, U, L, D, HID, hidden_blocks,
                               sk_g, sk_b, sk_c, sk_l, sk_d,
                               s1_g, s1_d, s1_k,
                               s2_g, s2_k, s2_d,
                               sb1_g, sb1_c, sb1_d, sb1_k,
                               sb2_g, sb2_c, sb2_k, sb2_d,
                               BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                               DTYPE: tl.constexpr, PREC: tl.constexpr, TAIL: tl.constexpr,
                               ITERS: tl.constexpr = 1, GELU_TANH: tl.constexpr = False,
                               BE: tl.constexpr = 0):
    """The shared weights' gradients, per (chunk, block of BH hidden units
    j): walks the chunk's rows, recomputes P_j, and writes the chunk's share
    (summed over chunks by the caller, in a fixed order)

        gw1[:, j] = K^T (gelu'(P_j) (Dh bW2[j]^T + bH w2[j]^T) + gelu''(P_j) B_j (K bW1[:, j]))
        gw2[j] = (gelu'(P_j) (K bW1[:, j]))^T Dh + gelu(P_j)^T bH,   B_j = Dh w2[j]^T,

    (G, C, D, HID) and (G, C, HID, D) float32."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        chunk, hid, hmask = _hidden_block(pid, hidden_blocks, HID, BH)
        gi, c, bi, ci = _chunk_of(chunk, C, U)
        _write_backward_cols(k_ptr + (gi * sk_g + bi * sk_b + ci * sk_c), dh_ptr, bh_ptr,
                             w1_ptr + gi * s1_g, w2_ptr + gi * s2_g,
                             bw1_ptr + gi * sb1_g + c * sb1_c, bw2_ptr + gi * sb2_g + c * sb2_c,
                             gw1_ptr, gw2_ptr, chunk.to(tl.int64), sk_l, sk_d, s1_d, s1_k, s2_k,
                             s2_d, sb1_d, sb1_k, sb2_k, sb2_d, hid, hmask, L, D, HID,
                             BM, BD, BE, BH, DTYPE, PREC, TAIL, GELU_TANH)


@triton.jit
def _backward_weight_tiles(w1_ptr, w2_ptr, bw1_ptr, bw2_ptr, s1_d, s1_k, s2_k, s2_d, sb1_d,
                           sb1_k, sb2_k, sb2_d, cols, cmask, hid, hmask, DTYPE: tl.constexpr):
    """w1, w2^T and their cotangents' tiles at one column block, in DTYPE."""
    w1, w2t = _weight_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols, cmask, hid, hmask)
    bw1, bw2t = _weight_tiles(bw1_ptr, sb1_d, sb1_k, bw2_ptr, sb2_k, sb2_d, cols, cmask, hid,
                              hmask)
    return w1.to(DTYPE), w2t.to(DTYPE), bw1.to(DTYPE), bw2t.to(DTYPE)


@triton.jit
def _write_backward_cols(k_base, dh_ptr, bh_ptr, w1_ptr, w2_ptr, bw1_ptr, bw2_ptr, gw1_ptr,
                         gw2_ptr, chunk, sk_l, sk_d, s1_d, s1_k, s2_k, s2_d, sb1_d, sb1_k, sb2_k,
                         sb2_d, hid, hmask, L, D, HID, BM: tl.constexpr,
                         BD: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
                         DTYPE: tl.constexpr, PREC: tl.constexpr, TAIL: tl.constexpr,
                         GELU_TANH: tl.constexpr):
    """``grads_backward_cols_kernel``'s work on the hidden units ``hid`` of
    chunk ``chunk`` (int64; ``k_base`` its keys, the weight pointers at its
    group and its cotangents): walks its rows and stores its shares."""
    cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
    w1, w2t, bw1, bw2t = _backward_weight_tiles(w1_ptr, w2_ptr, bw1_ptr, bw2_ptr, s1_d, s1_k,
                                                s2_k, s2_d, sb1_d, sb1_k, sb2_k, sb2_d, cols,
                                                cmask, hid, hmask, DTYPE)
    acc1 = tl.zeros((BD, BH), dtype=tl.float32)
    acc2 = tl.zeros((BH, BD), dtype=tl.float32)
    w1_b = w1
    w2t_b = w2t
    bw1_b = bw1
    bw2t_b = bw2t
    acc1_b = acc1
    acc2_b = acc2
    if BE > 0:
        w1_b, w2t_b, bw1_b, bw2t_b = _backward_weight_tiles(
            w1_ptr, w2_ptr, bw1_ptr, bw2_ptr, s1_d, s1_k, s2_k, s2_d, sb1_d, sb1_k, sb2_k, sb2_d,
            cols_b, cmask_b, hid, hmask, DTYPE)
        acc1_b = tl.zeros((BE, BH), dtype=tl.float32)
        acc2_b = tl.zeros((BH, BE), dtype=tl.float32)
    dh_base = dh_ptr + chunk * L * D
    bh_base = bh_ptr + chunk * L * D
    whole = L // BM * BM if TAIL < BM else L
    for r0 in range(0, whole, BM):
        acc1, acc2, acc1_b, acc2_b = _backward_cols_rows(
            k_base, dh_base, bh_base, sk_l, sk_d, r0, L, D, cols, cmask, cols_b, cmask_b, w1, w2t,
            bw1, bw2t, w1_b, w2t_b, bw1_b, bw2t_b, acc1, acc2, acc1_b, acc2_b, BM, BE, DTYPE,
            PREC, GELU_TANH)
    if TAIL < BM:  # as grads_cols_kernel's
        for r0 in range(whole, L, TAIL):
            acc1, acc2, acc1_b, acc2_b = _backward_cols_rows(
                k_base, dh_base, bh_base, sk_l, sk_d, r0, L, D, cols, cmask, cols_b, cmask_b, w1,
                w2t, bw1, bw2t, w1_b, w2t_b, bw1_b, bw2t_b, acc1, acc2, acc1_b, acc2_b, TAIL, BE,
                DTYPE, PREC, GELU_TANH)

    out = chunk * D * HID
    _store_weight_grads(gw1_ptr, gw2_ptr, out, acc1, acc2, 1.0, D, HID, cols, cmask, hid, hmask)
    if BE > 0:
        _store_weight_grads(gw1_ptr, gw2_ptr, out, acc1_b, acc2_b, 1.0, D, HID, cols_b, cmask_b,
                            hid, hmask)


@triton.jit
def grads_backward_chunk_kernel(k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr,
                                bw1_ptr, bw2_ptr, bg_ptr,
                                gk_ptr, gv_ptr, glr_ptr, gs_ptr, dh_ptr, bh_ptr, ko_ptr,
                                gw1_ptr, gw2_ptr,
                                C, U, L, D, HID, slots,
                                sk_g, sk_b, sk_c, sk_l, sk_d,
                                sv_g, sv_b, sv_c, sv_l, sv_d,
                                slr_g, slr_b, slr_c, slr_l,
                                sko_g, sko_b, sko_c, sko_l, sko_d,
                                s1_g, s1_d, s1_k,
                                s2_g, s2_k, s2_d,
                                sg_g, sg_d,
                                sb1_g, sb1_c, sb1_d, sb1_k,
                                sb2_g, sb2_c, sb2_k, sb2_d,
                                sbg_g, sbg_c, sbg_d,
                                eps,
                                BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                                DTYPE: tl.constexpr, PREC: tl.constexpr,
                                COPY_KEYS: tl.constexpr, TAIL: tl.constexpr,
                                ITERS: tl.constexpr = 1, GELU_TANH: tl.constexpr = False,
                                BE: tl.constexpr = 0):
    """The chunk gradients' backward in one program per chunk, as
    ``grads_chunk_kernel`` runs the forward: ``grads_backward_rows_kernel``'s
    work over the chunk's rows (BM at a time, the rest TAIL at a time; a
    share of g's gradient per block, ``gs`` (G * C, slots, D)), then
    ``grads_backward_cols_kernel``'s for each block of BH hidden units,
    reading back the Dh, cotangent and keys this program stored."""
    for it in range(ITERS):
        chunk = tl.program_id(0) * ITERS + it
        gi, c, bi, ci = _chunk_of(chunk, C, U)
        first = chunk.to(tl.int64)
        whole = L // BM * BM if TAIL < BM else L
        for r0 in range(0, whole, BM):
            _write_backward_rows(
                k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, bw1_ptr, bw2_ptr, bg_ptr, gk_ptr,
                gv_ptr, glr_ptr, gs_ptr, dh_ptr, bh_ptr, ko_ptr, gi, c, bi, ci, first, r0,
                first * slots + r0 // BM, L, D, HID, sk_g, sk_b, sk_c, sk_l, sk_d, sv_g, sv_b,
                sv_c, sv_l, sv_d, slr_g, slr_b, slr_c, slr_l, s1_g, s1_d, s1_k, s2_g, s2_k, s2_d,
                sg_g, sg_d, sb1_g, sb1_c, sb1_d, sb1_k, sb2_g, sb2_c, sb2_k, sb2_d, sbg_g, sbg_c,
                sbg_d, eps, BM, BD, BE, BH, DTYPE, PREC, COPY_KEYS, GELU_TANH)
        if TAIL < BM:
            for r0 in range(whole, L, TAIL):
                _write_backward_rows(
                    k_ptr, v_ptr, lr_ptr, w1_ptr, w2_ptr, g_ptr, bw1_ptr, bw2_ptr, bg_ptr,
                    gk_ptr, gv_ptr, glr_ptr, gs_ptr, dh_ptr, bh_ptr, ko_ptr, gi, c, bi, ci, first,
                    r0, first * slots + whole // BM + (r0 - whole) // TAIL, L, D, HID, sk_g,
                    sk_b, sk_c, sk_l, sk_d, sv_g, sv_b, sv_c, sv_l, sv_d, slr_g, slr_b, slr_c,
                    slr_l, s1_g, s1_d, s1_k, s2_g, s2_k, s2_d, sg_g, sg_d, sb1_g, sb1_c, sb1_d,
                    sb1_k, sb2_g, sb2_c, sb2_k, sb2_d, sbg_g, sbg_c, sbg_d, eps, TAIL, BD, BE,
                    BH, DTYPE, PREC, COPY_KEYS, GELU_TANH)
        # the chunk's Dh, cotangent and keys, stored by all of this program's threads
        tl.debug_barrier()
        k_base = ko_ptr + (gi * sko_g + bi * sko_b + ci * sko_c)
        for h0 in range(0, HID, BH):
            hid = h0 + tl.arange(0, BH)
            _write_backward_cols(k_base, dh_ptr, bh_ptr, w1_ptr + gi * s1_g, w2_ptr + gi * s2_g,
                                 bw1_ptr + gi * sb1_g + c * sb1_c,
                                 bw2_ptr + gi * sb2_g + c * sb2_c, gw1_ptr, gw2_ptr, first,
                                 sko_l, sko_d, s1_d, s1_k, s2_k, s2_d, sb1_d, sb1_k, sb2_k, sb2_d,
                                 hid, hid < HID, L, D, HID, BM, BD, BE, BH, DTYPE, PREC,
                                 TAIL, GELU_TANH)


@triton.jit
def _whole_rows_times(xo, xo_b, w_ptr, sw_o, sw_i, row0, cols, cmask, cols_b, cmask_b, outs,
                      omask, BE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """The normed rows ``xo`` (and ``xo_b``, BE > 0), in DTYPE, times
    w[row0 + outs, :]^T: one product per column block of the features. The
    tiles load transposed: ``_times_wt`` of ``_weight_rows`` (the backward's
    layout) spilled 4 to 12 B at M3's 32-row tiles, where this spills none."""
    w = tl.load(w_ptr + (row0 + outs)[None, :] * sw_o + cols[:, None] * sw_i,
                mask=cmask[:, None] & omask[None, :], other=0.0)
    acc = tl.dot(xo, w.to(DTYPE), input_precision=PREC)
    if BE > 0:
        w_b = tl.load(w_ptr + (row0 + outs)[None, :] * sw_o + cols_b[:, None] * sw_i,
                      mask=cmask_b[:, None] & omask[None, :], other=0.0)
        acc = tl.dot(xo_b, w_b.to(DTYPE), acc=acc, input_precision=PREC)
    return acc


@triton.jit
def _rows_times(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i, row0, cols, cmask,
                cols_b, cmask_b, outs, omask, BM: tl.constexpr, BD: tl.constexpr,
                BE: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, DTYPE: tl.constexpr,
                PREC: tl.constexpr):
    """The rows' normed features times w[row0 + outs, :]^T -> (BM, BO)
    float32: the projections' outputs ``outs``. BK == BD: whole rows,
    products with ``xo`` (and ``xo_b``), the normed rows' column blocks in
    DTYPE; else over BK-wide slices of the features, each reloaded from x
    (``x_rows`` the rows' pointers) and normed by ``rstd``, so that no
    (BD, BO) weight tile is held at once."""
    if BK == BD:
        acc = _whole_rows_times(xo, xo_b, w_ptr, sw_o, sw_i, row0, cols, cmask, cols_b, cmask_b,
                                outs, omask, BE, DTYPE, PREC)
    else:
        acc = tl.zeros((BM, BO), dtype=tl.float32)
        for k0 in range(0, D, BK):
            k = k0 + tl.arange(0, BK)
            kmask = k < D
            xk = tl.load(x_rows[:, None] + k[None, :] * sx_d, mask=rmask[:, None] & kmask[None, :],
                         other=0.0) * rstd[:, None]
            w = tl.load(w_ptr + (row0 + outs)[None, :] * sw_o + k[:, None] * sw_i,
                        mask=kmask[:, None] & omask[None, :], other=0.0)
            acc = tl.dot(xk.to(DTYPE), w.to(DTYPE), acc=acc, input_precision=PREC)
    return acc


@triton.jit
def _rows_times_blocks(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i, row0, cols,
                       cmask, cols_b, cmask_b, outs, omask, outs_b, omask_b, BM: tl.constexpr,
                       BD: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
                       BOE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """``_rows_times`` of the outputs ``outs`` (BO) and, BOE > 0, of a second
    block ``outs_b`` (BOE; else the first again), one after the other: one
    loop over the features for both spilled 1.9 KB at M4's 32-row tiles."""
    acc = _rows_times(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i, row0, cols,
                      cmask, cols_b, cmask_b, outs, omask, BM, BD, BE, BK, BO, DTYPE, PREC)
    acc_b = acc
    if BOE > 0:
        acc_b = _rows_times(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i, row0,
                            cols, cmask, cols_b, cmask_b, outs_b, omask_b, BM, BD, BE, BK, BOE,
                            DTYPE, PREC)
    return acc, acc_b


@triton.jit
def _normed_head(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i, gamma_ptr, sg_h,
                 sg_d, row, HD, cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b, hmask_b,
                 eps, BM: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                 BHD: tl.constexpr, BHE: tl.constexpr, DTYPE: tl.constexpr,
                 PREC: tl.constexpr):
    """One head's queries or keys: RMSNorm over its HD columns of the rows
    times w[row * HD:(row + 1) * HD]^T, times its gain row ``gamma[row]``;
    the head's columns in one block (BHD) or two (BHD + BHE)."""
    y, y_b = _rows_times_blocks(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i,
                                row * HD, cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b,
                                hmask_b, BM, BD, BE, BK, BHD, BHE, DTYPE, PREC)
    y_rstd = tl.math.rsqrt(_row_sum(y * y, y_b * y_b, BHE) / HD + eps)
    gamma = tl.load(gamma_ptr + row * sg_h + hcols * sg_d, mask=hmask, other=0.0)
    out = y * y_rstd[:, None] * gamma[None, :]
    out_b = out
    if BHE > 0:
        gamma_b = tl.load(gamma_ptr + row * sg_h + hcols_b * sg_d, mask=hmask_b, other=0.0)
        out_b = y_b * y_rstd[:, None] * gamma_b[None, :]
    return out, out_b


@triton.jit
def _store_rows(base, rows, s_n, cols, s_d, y, rmask, cmask, y_b, cols_b, cmask_b,
                BE: tl.constexpr):
    """Stores (BM, ...) rows at ``base``, both column blocks."""
    tl.store(base + rows[:, None] * s_n + cols[None, :] * s_d, y,
             mask=rmask[:, None] & cmask[None, :])
    if BE > 0:
        tl.store(base + rows[:, None] * s_n + cols_b[None, :] * s_d, y_b,
                 mask=rmask[:, None] & cmask_b[None, :])


@triton.jit
def _pool_step(logits, normed, rmask, running_max, running_sum, pooled):
    """One block of rows into the pool's online softmax over rows, per
    feature: the new running max, sum and pooled sum."""
    logits = tl.where(rmask[:, None], logits, float('-inf'))
    new_max = tl.maximum(running_max, tl.max(logits, axis=0))
    rescale = tl.exp(running_max - new_max)
    p = tl.exp(logits - new_max[None, :])
    return (new_max, running_sum * rescale + tl.sum(p, axis=0),
            pooled * rescale + tl.sum(p * normed, axis=0))


@triton.jit
def _store_pool(pool_ptr, lse_ptr, at, offsets, cmask, running_max, running_sum, pooled):
    """The pool's result and log-sum-exp of one column block of a chunk (its
    features at ``at + offsets``)."""
    tl.store(pool_ptr + at + offsets, pooled / running_sum, mask=cmask)
    tl.store(lse_ptr + at + offsets, running_max + tl.log(running_sum), mask=cmask)


@triton.jit
def _projection_program(C, U, L, D, HD, H, BD: tl.constexpr, BE: tl.constexpr,
                        BHD: tl.constexpr, BHE: tl.constexpr, BH: tl.constexpr):
    """A projection kernel's program: its chunk c of C, image b, whether the
    chunk writes (c < U), its first row, and the column blocks with their
    masks (``_columns``) of x (BD, BE), of one head (BHD, BHE) and of the
    step sizes (BH)."""
    pid = tl.program_id(0)
    c = pid % C
    cols, cmask, cols_b, cmask_b = _columns(D, BD, BE)
    hcols, hmask, hcols_b, hmask_b = _columns(HD, BHD, BHE)
    lcols = tl.arange(0, BH)
    return (c, (pid // C).to(tl.int64), c < U, c.to(tl.int64) * L, cols, cmask, cols_b,
            cmask_b, hcols, hmask, hcols_b, hmask_b, lcols, lcols < H)


@triton.jit
def project_kernel(x_ptr, w_ptr, bias_ptr, gamma_ptr,
                   q_ptr, k_ptr, v_ptr, lr_ptr, pool_ptr, lse_ptr,
                   N, L, C, U, D, H, HD, max_lr, eps,
                   sx_b, sx_n, sx_d, sw_o, sw_i, sg_h, sg_d,
                   sq_b, sq_n, sq_h, sq_d,
                   sk_b, sk_n, sk_h, sk_d,
                   sv_b, sv_n, sv_d,
                   sl_b, sl_n, sl_h,
                   ss_b, ss_u, ss_d,
                   BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BHD: tl.constexpr,
                   BH: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
                   BE: tl.constexpr = 0, BHE: tl.constexpr = 0):
    """The projections of one (image, chunk) of L tokens, C chunks per image
    (the last partial): x / rms(x) once per block of rows, each head's
    queries RMS-normed with its gain; for the U written chunks also keys
    (likewise), values, the step sizes ``max_lr * sigmoid`` and the pool's
    softmax over the chunk's rows, online (a running max and sum per
    feature), so the chunk's pooled rows need no second pass; the pool's
    log-sum-exp per feature is stored for the backward. ``w`` (4D + H, D)
    is the folded weight (``project.weights.fold``), in DTYPE; its products
    take BK features at a time (``_rows_times``). BE > 0 (BHE > 0): rows
    (a head's columns) in two column blocks (``_columns``)."""
    c, b, written, first, cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b, hmask_b, \
        lcols, lmask = _projection_program(C, U, L, D, HD, H, BD, BE, BHD, BHE, BH)
    x_base = x_ptr + b * sx_b + first * sx_n
    logits_bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
    lr_bias = tl.load(bias_ptr + D + lcols, mask=lmask, other=0.0)
    running_max = tl.full((BD,), float('-inf'), tl.float32)
    running_sum = tl.zeros((BD,), dtype=tl.float32)
    pooled = tl.zeros((BD,), dtype=tl.float32)
    logits_bias_b, running_max_b, running_sum_b, pooled_b = (logits_bias, running_max,
                                                            running_sum, pooled)
    if BE > 0:
        logits_bias_b = tl.load(bias_ptr + cols_b, mask=cmask_b, other=0.0)
        running_max_b = tl.full((BE,), float('-inf'), tl.float32)
        running_sum_b = tl.zeros((BE,), dtype=tl.float32)
        pooled_b = tl.zeros((BE,), dtype=tl.float32)
    for r0 in range(0, L, BM):
        i = r0 + tl.arange(0, BM)
        rmask = (i < L) & (first + i < N)
        x_rows = x_base + i * sx_n
        x = _load_tile(x_base, i, sx_n, cols, sx_d, rmask[:, None] & cmask[None, :])
        x_b = x
        if BE > 0:
            x_b = _load_tile(x_base, i, sx_n, cols_b, sx_d, rmask[:, None] & cmask_b[None, :])
        rstd = tl.math.rsqrt(_row_sum(x * x, x_b * x_b, BE) / D + eps)
        normed = x * rstd[:, None]
        normed_b = x_b * rstd[:, None]
        xo = normed.to(DTYPE)
        xo_b = normed_b.to(DTYPE)
        for head in range(0, H):
            q, q_b = _normed_head(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i,
                                  gamma_ptr, sg_h, sg_d, head, HD, cols, cmask, cols_b, cmask_b,
                                  hcols, hmask, hcols_b, hmask_b, eps, BM, BD, BE, BK, BHD, BHE,
                                  DTYPE, PREC)
            _store_rows(q_ptr + b * sq_b + first * sq_n + head * sq_h, i, sq_n, hcols, sq_d, q,
                        rmask, hmask, q_b, hcols_b, hmask_b, BHE)
            if written:
                k, k_b = _normed_head(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i,
                                      gamma_ptr, sg_h, sg_d, H + head, HD, cols, cmask, cols_b,
                                      cmask_b, hcols, hmask, hcols_b, hmask_b, eps, BM, BD, BE,
                                      BK, BHD, BHE, DTYPE, PREC)
                _store_rows(k_ptr + b * sk_b + first * sk_n + head * sk_h, i, sk_n, hcols, sk_d,
                            k, rmask, hmask, k_b, hcols_b, hmask_b, BHE)
        if written:
            v, v_b = _rows_times_blocks(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o,
                                        sw_i, 2 * D, cols, cmask, cols_b, cmask_b, cols, cmask,
                                        cols_b, cmask_b, BM, BD, BE, BK, BD, BE, DTYPE, PREC)
            _store_rows(v_ptr + b * sv_b + first * sv_n, i, sv_n, cols, sv_d, v, rmask, cmask,
                        v_b, cols_b, cmask_b, BE)
            logits, logits_b = _rows_times_blocks(
                xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i, 3 * D, cols, cmask,
                cols_b, cmask_b, cols, cmask, cols_b, cmask_b, BM, BD, BE, BK, BD, BE, DTYPE,
                PREC)
            running_max, running_sum, pooled = _pool_step(
                logits + logits_bias[None, :], normed, rmask, running_max, running_sum, pooled)
            if BE > 0:
                running_max_b, running_sum_b, pooled_b = _pool_step(
                    logits_b + logits_bias_b[None, :], normed_b, rmask, running_max_b,
                    running_sum_b, pooled_b)
            lr = _rows_times(xo, xo_b, x_rows, sx_d, rstd, rmask, D, w_ptr, sw_o, sw_i, 4 * D,
                             cols, cmask, cols_b, cmask_b, lcols, lmask, BM, BD, BE, BK, BH,
                             DTYPE, PREC)
            tl.store(lr_ptr + b * sl_b + first * sl_n + i[:, None] * sl_n + lcols[None, :] * sl_h,
                     max_lr * tl.sigmoid(lr + lr_bias[None, :]),
                     mask=rmask[:, None] & lmask[None, :])
    if written:
        pool_at = b * ss_b + c.to(tl.int64) * ss_u
        _store_pool(pool_ptr, lse_ptr, pool_at, cols * ss_d, cmask, running_max, running_sum,
                    pooled)
        if BE > 0:
            _store_pool(pool_ptr, lse_ptr, pool_at, cols_b * ss_d, cmask_b, running_max_b,
                        running_sum_b, pooled_b)


@triton.jit
def _weight_rows(w_ptr, sw_o, sw_i, row0, outs, omask, cols, cmask, cols_b, cmask_b,
                 BE: tl.constexpr, DTYPE: tl.constexpr):
    """Rows ``row0 + outs`` of the folded weight, (BO, BD) in DTYPE, and
    with BE > 0 their second column block (BO, BE) (else the first again):
    the backward's two products with them (x w^T again, and dy w) share one
    load."""
    w = tl.load(w_ptr + (row0 + outs)[:, None] * sw_o + cols[None, :] * sw_i,
                mask=omask[:, None] & cmask[None, :], other=0.0).to(DTYPE)
    w_b = w
    if BE > 0:
        w_b = tl.load(w_ptr + (row0 + outs)[:, None] * sw_o + cols_b[None, :] * sw_i,
                      mask=omask[:, None] & cmask_b[None, :], other=0.0).to(DTYPE)
    return w, w_b


@triton.jit
def _times_wt(xo, xo_b, w, w_b, BE: tl.constexpr, PREC: tl.constexpr):
    """The normed rows (both column blocks) times ``_weight_rows``'s rows^T."""
    y = tl.dot(xo, tl.trans(w), input_precision=PREC)
    if BE > 0:
        y = tl.dot(xo_b, tl.trans(w_b), acc=y, input_precision=PREC)
    return y


@triton.jit
def _plus_times_w(bar, w, w_b, bar_n, bar_n_b, BE: tl.constexpr, DTYPE: tl.constexpr,
                  PREC: tl.constexpr):
    """``bar_n`` (both column blocks) plus ``bar`` times ``_weight_rows``'s rows."""
    bar = bar.to(DTYPE)
    bar_n = tl.dot(bar, w, acc=bar_n, input_precision=PREC)
    if BE > 0:
        bar_n_b = tl.dot(bar, w_b, acc=bar_n_b, input_precision=PREC)
    return bar_n, bar_n_b


@triton.jit
def _store_product_grad(gp_rows, sgp_f, outs, rmask, omask, bar, rstd, DTYPE: tl.constexpr):
    """The product's gradient ``bar`` times the rows' rstd, at columns ``outs``."""
    tl.store(gp_rows[:, None] + outs[None, :] * sgp_f, (bar * rstd[:, None]).to(DTYPE),
             mask=rmask[:, None] & omask[None, :])


@triton.jit
def _gain_backward(bar_rows, sb_d, hcols, hmask, rmask, normed, gamma_ptr, sg_h, sg_d, gg_ptr,
                   row, HD):
    """One column block of a head's cotangent (``bar_rows``, (BM, 1)
    pointers) back through its gain: stores the gain's partial sum and
    returns the cotangent times the gain."""
    bar = tl.load(bar_rows + hcols[None, :] * sb_d, mask=rmask[:, None] & hmask[None, :],
                  other=0.0)
    gamma = tl.load(gamma_ptr + row * sg_h + hcols * sg_d, mask=hmask, other=0.0)
    tl.store(gg_ptr + row * HD + hcols, tl.sum(bar * normed, axis=0), mask=hmask)
    return bar * gamma[None, :]


@triton.jit
def _head_backward(xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h,
                   sg_d, bar_rows, sb_d, gp_rows, sgp_f, gg_ptr, row, HD, cols, cmask, cols_b,
                   cmask_b, hcols, hmask, hcols_b, hmask_b, eps, BE: tl.constexpr,
                   BHE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """One head's queries or keys backward: from their cotangent (rows at
    ``bar_rows``, (BM, 1) pointers) through the gain and the per-head
    RMSNorm to the product's output; stores it times the rows' rstd into the
    product-gradient rows ``gp_rows`` and the gain's partial sum at
    ``gg_ptr``; returns ``bar_n`` plus its product with the head's weight
    rows. The rows' features in one or two column blocks (BE), the head's
    columns too (BHE)."""
    w, w_b = _weight_rows(w_ptr, sw_o, sw_i, row * HD, hcols, hmask, cols, cmask, cols_b,
                          cmask_b, BE, DTYPE)
    y = _times_wt(xo, xo_b, w, w_b, BE, PREC)
    y_b, wh, wh_b = y, w, w_b
    if BHE > 0:
        wh, wh_b = _weight_rows(w_ptr, sw_o, sw_i, row * HD, hcols_b, hmask_b, cols, cmask,
                                cols_b, cmask_b, BE, DTYPE)
        y_b = _times_wt(xo, xo_b, wh, wh_b, BE, PREC)
    y_rstd = tl.math.rsqrt(_row_sum(y * y, y_b * y_b, BHE) / HD + eps)
    normed = y * y_rstd[:, None]
    normed_b = y_b * y_rstd[:, None]
    bar = _gain_backward(bar_rows, sb_d, hcols, hmask, rmask, normed, gamma_ptr, sg_h, sg_d,
                         gg_ptr, row, HD)
    bar_b = bar
    if BHE > 0:
        bar_b = _gain_backward(bar_rows, sb_d, hcols_b, hmask_b, rmask, normed_b, gamma_ptr,
                               sg_h, sg_d, gg_ptr, row, HD)
    mean = _row_sum(bar * normed, bar_b * normed_b, BHE) / HD
    bar_y = y_rstd[:, None] * (bar - normed * mean[:, None])
    _store_product_grad(gp_rows, sgp_f, row * HD + hcols, rmask, hmask, bar_y, rstd, DTYPE)
    if BHE > 0:
        # a head in two blocks: its weight rows reloaded (from L2) for this product
        # rather than held through the norm's backward
        w, w_b = _weight_rows(w_ptr, sw_o, sw_i, row * HD, hcols, hmask, cols, cmask, cols_b,
                              cmask_b, BE, DTYPE)
    bar_n, bar_n_b = _plus_times_w(bar_y, w, w_b, bar_n, bar_n_b, BE, DTYPE, PREC)
    if BHE > 0:
        bar_y_b = y_rstd[:, None] * (bar_b - normed_b * mean[:, None])
        _store_product_grad(gp_rows, sgp_f, row * HD + hcols_b, rmask, hmask_b, bar_y_b, rstd,
                            DTYPE)
        wh, wh_b = _weight_rows(w_ptr, sw_o, sw_i, row * HD, hcols_b, hmask_b, cols, cmask,
                                cols_b, cmask_b, BE, DTYPE)
        bar_n, bar_n_b = _plus_times_w(bar_y_b, wh, wh_b, bar_n, bar_n_b, BE, DTYPE, PREC)
    return bar_n, bar_n_b


@triton.jit
def _values_pool_backward(xo, xo_b, normed, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i,
                          bias_ptr, v_rows, sv_h, sv_d, pool_ptr, lse_ptr, pool_at, ss_d,
                          bpool_ptr, bpool_at, sp_d, gp_rows, sgp_f, gb_block, D, HD, outs,
                          omask, cols, cmask, cols_b, cmask_b, BE: tl.constexpr,
                          DTYPE: tl.constexpr, PREC: tl.constexpr):
    """The values' and the pool's backward for the features ``outs`` (one
    column block; ``normed`` its normed rows): stores their product
    gradients and the logits' bias partial sums; returns the pool's direct
    term of those features' cotangent, and ``bar_n`` (both column blocks)
    plus the products with the weight."""
    ro = rmask[:, None] & omask[None, :]
    # the values: their cotangent is the product's own
    bar_v = tl.load(v_rows[:, None] + (outs // HD)[None, :] * sv_h + (outs % HD)[None, :] * sv_d,
                    mask=ro, other=0.0)
    w, w_b = _weight_rows(w_ptr, sw_o, sw_i, 2 * D, outs, omask, cols, cmask, cols_b, cmask_b,
                          BE, DTYPE)
    _store_product_grad(gp_rows, sgp_f, 2 * D + outs, rmask, omask, bar_v, rstd, DTYPE)
    bar_n, bar_n_b = _plus_times_w(bar_v, w, w_b, bar_n, bar_n_b, BE, DTYPE, PREC)
    # the pool: pooled = sum_i a_i n_i with a = softmax over the chunk's rows
    # (the per-feature vectors loaded here, per block: registers are short)
    pooled = tl.load(pool_ptr + pool_at + outs * ss_d, mask=omask, other=0.0)
    lse = tl.load(lse_ptr + pool_at + outs * ss_d, mask=omask, other=0.0)
    bar_pool = tl.load(bpool_ptr + bpool_at + outs * sp_d, mask=omask, other=0.0)
    logits_bias = tl.load(bias_ptr + outs, mask=omask, other=0.0)
    w, w_b = _weight_rows(w_ptr, sw_o, sw_i, 3 * D, outs, omask, cols, cmask, cols_b, cmask_b,
                          BE, DTYPE)
    logits = _times_wt(xo, xo_b, w, w_b, BE, PREC) + logits_bias[None, :]
    a = tl.where(ro, tl.exp(logits - lse[None, :]), 0.0)
    bar_logits = a * bar_pool[None, :] * (normed - pooled[None, :])
    _store_product_grad(gp_rows, sgp_f, 3 * D + outs, rmask, omask, bar_logits, rstd, DTYPE)
    tl.store(gb_block + outs, tl.sum(bar_logits, axis=0), mask=omask)
    bar_n, bar_n_b = _plus_times_w(bar_logits, w, w_b, bar_n, bar_n_b, BE, DTYPE, PREC)
    return a * bar_pool[None, :], bar_n, bar_n_b


@triton.jit
def project_backward_kernel(x_ptr, w_ptr, bias_ptr, gamma_ptr, pool_ptr, lse_ptr,
                            bq_ptr, bk_ptr, bv_ptr, blr_ptr, bpool_ptr,
                            gx_ptr, gp_ptr, gg_ptr, gb_ptr,
                            N, L, C, U, D, H, HD, max_lr, eps, row_blocks,
                            sx_b, sx_n, sx_d, sw_o, sw_i, sg_h, sg_d, ss_b, ss_u, ss_d,
                            sq_b, sq_n, sq_h, sq_d,
                            sk_b, sk_n, sk_h, sk_d,
                            sv_b, sv_n, sv_h, sv_d,
                            sl_b, sl_n, sl_h,
                            sp_b, sp_u, sp_d,
                            sgx_b, sgx_n, sgx_d, sgp_b, sgp_n, sgp_f,
                            BM: tl.constexpr, BD: tl.constexpr, BHD: tl.constexpr,
                            BH: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
                            BE: tl.constexpr = 0, BHE: tl.constexpr = 0):
    """``project_kernel``'s backward for one (image, chunk), whole rows per
    product (BD wide, and BE for a second column block; a head's columns
    BHD and BHE): recomputes each product, takes the cotangents of the
    queries, keys, values, step sizes and pooled rows back through the
    gains, the per-head RMSNorms, the sigmoid and the pool's softmax (from
    the forward's log-sum-exp and pooled rows) to the product's output
    ``dy``, and from there to x through the RMSNorm. Writes x's gradient,
    ``dy`` times the rows' rstd into ``gp`` (B, N, 4D + H) in DTYPE (the
    weight's gradient is one product of it with x, outside), and per block of
    rows the gains' and the biases' partial sums (``gg``, ``gb``)."""
    pid = tl.program_id(0)
    c, b, written, first, cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b, hmask_b, \
        lcols, lmask = _projection_program(C, U, L, D, HD, H, BD, BE, BHD, BHE, BH)
    pool_at = b * ss_b + c.to(tl.int64) * ss_u
    bpool_at = b * sp_b + c.to(tl.int64) * sp_u
    # int64 bases of the chunk's rows; int32 offsets inside them
    x_base = x_ptr + b * sx_b + first * sx_n
    q_base = bq_ptr + b * sq_b + first * sq_n
    k_base = bk_ptr + b * sk_b + first * sk_n
    v_base = bv_ptr + b * sv_b + first * sv_n
    lr_base = blr_ptr + b * sl_b + first * sl_n
    gp_base = gp_ptr + b * sgp_b + first * sgp_n
    gx_base = gx_ptr + b * sgx_b + first * sgx_n
    for r0 in range(0, L, BM):
        i = r0 + tl.arange(0, BM)
        rmask = (i < L) & (first + i < N)
        x = _load_tile(x_base, i, sx_n, cols, sx_d, rmask[:, None] & cmask[None, :])
        x_b = x
        if BE > 0:
            x_b = _load_tile(x_base, i, sx_n, cols_b, sx_d, rmask[:, None] & cmask_b[None, :])
        rstd = tl.math.rsqrt(_row_sum(x * x, x_b * x_b, BE) / D + eps)
        normed = x * rstd[:, None]
        normed_b = x_b * rstd[:, None]
        xo = normed.to(DTYPE)
        xo_b = normed_b.to(DTYPE)
        gp_rows = gp_base + i * sgp_n
        block = (pid * row_blocks + r0 // BM).to(tl.int64)
        gg_block = gg_ptr + block * 2 * H * HD
        bar_n = tl.zeros((BM, BD), dtype=tl.float32)
        bar_n_b = bar_n
        if BE > 0:
            bar_n_b = tl.zeros((BM, BE), dtype=tl.float32)
        for head in range(0, H):
            bar_n, bar_n_b = _head_backward(
                xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h, sg_d,
                q_base + i[:, None] * sq_n + head * sq_h, sq_d, gp_rows, sgp_f, gg_block, head,
                HD, cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b, hmask_b, eps, BE, BHE,
                DTYPE, PREC)
            if written:
                bar_n, bar_n_b = _head_backward(
                    xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h,
                    sg_d, k_base + i[:, None] * sk_n + head * sk_h, sk_d, gp_rows, sgp_f,
                    gg_block, H + head, HD, cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b,
                    hmask_b, eps, BE, BHE, DTYPE, PREC)
        if written:
            gb_block = gb_ptr + block * (D + H)
            v_rows = v_base + i * sv_n
            direct, bar_n, bar_n_b = _values_pool_backward(
                xo, xo_b, normed, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, bias_ptr,
                v_rows, sv_h, sv_d, pool_ptr, lse_ptr, pool_at, ss_d, bpool_ptr, bpool_at, sp_d,
                gp_rows, sgp_f, gb_block, D, HD, cols, cmask, cols, cmask, cols_b, cmask_b, BE,
                DTYPE, PREC)
            bar_n += direct
            if BE > 0:
                direct_b, bar_n, bar_n_b = _values_pool_backward(
                    xo, xo_b, normed_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i,
                    bias_ptr, v_rows, sv_h, sv_d, pool_ptr, lse_ptr, pool_at, ss_d, bpool_ptr,
                    bpool_at, sp_d, gp_rows, sgp_f, gb_block, D, HD, cols_b, cmask_b, cols,
                    cmask, cols_b, cmask_b, BE, DTYPE, PREC)
                bar_n_b += direct_b
            # the step sizes: max_lr * sigmoid(z)
            w, w_b = _weight_rows(w_ptr, sw_o, sw_i, 4 * D, lcols, lmask, cols, cmask, cols_b,
                                  cmask_b, BE, DTYPE)
            lr_bias = tl.load(bias_ptr + D + lcols, mask=lmask, other=0.0)
            lr = tl.sigmoid(_times_wt(xo, xo_b, w, w_b, BE, PREC) + lr_bias[None, :])
            bar_lr = tl.load(lr_base + i[:, None] * sl_n + lcols[None, :] * sl_h,
                             mask=rmask[:, None] & lmask[None, :],
                             other=0.0) * (max_lr * lr * (1.0 - lr))
            _store_product_grad(gp_rows, sgp_f, 4 * D + lcols, rmask, lmask, bar_lr, rstd, DTYPE)
            bar_n, bar_n_b = _plus_times_w(bar_lr, w, w_b, bar_n, bar_n_b, BE, DTYPE, PREC)
            tl.store(gb_block + D + lcols, tl.sum(bar_lr, axis=0), mask=lmask)
        # x / rms(x): bar_x = rstd (bar_n - n mean(bar_n n))
        mean = _row_sum(bar_n * normed, bar_n_b * normed_b, BE) / D
        _store_rows(gx_base, i, sgx_n, cols, sgx_d,
                    rstd[:, None] * (bar_n - normed * mean[:, None]), rmask, cmask,
                    rstd[:, None] * (bar_n_b - normed_b * mean[:, None]), cols_b, cmask_b, BE)


@triton.jit
def scan_kernel(g_ptr, lr_ptr, keep_ptr, momentum_ptr, w0_ptr, out_ptr, U, P, blocks,
                sg_n, sg_u, sg_p, sl_n, sl_u, sk_n, sk_u, sm_n, sm_u, sw_n, sw_p,
                so_n, so_u, so_p,
                HAS_INITIAL: tl.constexpr, BP: tl.constexpr):
    """The momentum/decay recursion of one row's block of BP entries, step by
    step in float32: S_t = eta_t S_{t-1} - rho_t G_t, W_t = keep_t W_{t-1} + S_t
    (``scan_states_naive``); each W_t is written in the output's dtype, so a
    16-bit state costs no cast kernel."""
    pid = tl.program_id(0)
    n = (pid // blocks).to(tl.int64)
    p = (pid % blocks) * BP + tl.arange(0, BP)
    mask = p < P
    if HAS_INITIAL:
        w = tl.load(w0_ptr + n * sw_n + p * sw_p, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.zeros((BP,), dtype=tl.float32)
    s = tl.zeros((BP,), dtype=tl.float32)
    out = out_ptr + n * so_n + p * so_p
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)
    g_row = g_ptr + n * sg_n + p * sg_p
    for t in range(0, U):
        keep = tl.exp(tl.load(keep_ptr + n * sk_n + t * sk_u))
        eta = tl.exp(tl.load(momentum_ptr + n * sm_n + t * sm_u))
        rho = tl.load(lr_ptr + n * sl_n + t * sl_u)
        s = eta * s - rho * tl.load(g_row + t * sg_u, mask=mask, other=0.0)
        w = keep * w + s
        tl.store(out + (t + 1) * so_u, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scan_backward_kernel(g_ptr, lr_ptr, keep_ptr, momentum_ptr, w_ptr, bar_ptr,
                         d_g_ptr, d_w0_ptr, d_lr_ptr, d_keep_ptr, d_momentum_ptr, U, P, blocks,
                         sg_n, sg_u, sg_p, sl_n, sl_u, sk_n, sk_u, sm_n, sm_u,
                         sw_n, sw_u, sw_p, sb_n, sb_u, sb_p, sd_n, sd_u, sd_p, s0_n, s0_p,
                         HAS_INITIAL: tl.constexpr, BP: tl.constexpr):
    """``scan_kernel``'s vector-Jacobian product for one row's block of BP
    entries. A forward pass reruns the momenta S_t into dG's own storage
    (S_t from W_t - keep_t W_{t-1} would cancel where the updates are small
    against W); then, walking the steps backwards with the saved states
    W_0..W_U, the adjoints A_t = bar_t + keep_{t+1} A_{t+1} of W_t and
    M_t = A_t + eta_{t+1} M_{t+1} of S_t give dG_t = -rho_t M_t (over S_t,
    read first) and the block's shares of the gates' gradients,
    -<M_t, G_t> (rho_t), keep_t <A_t, W_{t-1}> (log keep_t) and
    eta_t <M_t, S_{t-1}> (log eta_t), written per block (summed in a fixed
    order by the wrapper); A_0 is W_0's gradient."""
    pid = tl.program_id(0)
    n = (pid // blocks).to(tl.int64)
    block = pid % blocks
    p = block * BP + tl.arange(0, BP)
    mask = p < P
    w_row = w_ptr + n * sw_n + p * sw_p
    bar_row = bar_ptr + n * sb_n + p * sb_p
    g_row = g_ptr + n * sg_n + p * sg_p
    d_row = d_g_ptr + n * sd_n + p * sd_p
    s = tl.zeros((BP,), dtype=tl.float32)
    for t in range(0, U):  # S_{t+1} into d_row[t]
        eta = tl.exp(tl.load(momentum_ptr + n * sm_n + t * sm_u))
        rho = tl.load(lr_ptr + n * sl_n + t * sl_u)
        s = eta * s - rho * tl.load(g_row + t * sg_u, mask=mask, other=0.0)
        tl.store(d_row + t * sd_u, s, mask=mask)
    shares = (n * blocks + block) * U  # (N, blocks, U) gate shares
    adj_w = tl.zeros((BP,), dtype=tl.float32)
    adj_s = tl.zeros((BP,), dtype=tl.float32)
    keep_next = 0.0
    eta_next = 0.0
    for i in range(0, U):
        t = U - i  # the step, U down to 1; its inputs sit at index t - 1
        keep = tl.exp(tl.load(keep_ptr + n * sk_n + (t - 1) * sk_u))
        eta = tl.exp(tl.load(momentum_ptr + n * sm_n + (t - 1) * sm_u))
        rho = tl.load(lr_ptr + n * sl_n + (t - 1) * sl_u)
        adj_w = tl.load(bar_row + t * sb_u, mask=mask, other=0.0) + keep_next * adj_w
        adj_s = adj_w + eta_next * adj_s
        grad = tl.load(g_row + (t - 1) * sg_u, mask=mask, other=0.0)
        w_prev = tl.load(w_row + (t - 1) * sw_u, mask=mask, other=0.0)
        s_prev = tl.zeros((BP,), dtype=tl.float32)  # S_0 = 0
        if t > 1:  # S_{t-1}, at d_row[t - 2]: overwritten by dG_{t-1} only at step t - 1
            s_prev = tl.load(d_row + (t - 2) * sd_u, mask=mask, other=0.0)
        tl.store(d_row + (t - 1) * sd_u, -rho * adj_s, mask=mask)
        tl.store(d_lr_ptr + shares + t - 1, -tl.sum(adj_s * grad, axis=0))
        tl.store(d_keep_ptr + shares + t - 1, keep * tl.sum(adj_w * w_prev, axis=0))
        tl.store(d_momentum_ptr + shares + t - 1, eta * tl.sum(adj_s * s_prev, axis=0))
        keep_next = keep
        eta_next = eta
    if HAS_INITIAL:
        adj_w = tl.load(bar_row, mask=mask, other=0.0) + keep_next * adj_w
        tl.store(d_w0_ptr + n * s0_n + p * s0_p, adj_w, mask=mask)
