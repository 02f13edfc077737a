"""The projections' Triton kernels (imports triton): the fused norm, projection,
pool and heads of ``project_kernel``, and its backward. Their launchers are in
``project.triton``.

Import this module only through ``kernels.availability.load_kernels('project')``
(``TRITON_INTERPRET=1`` must be set before it is first imported). The
conventions they share (operand dtypes, column blocks, addressing) are
``triton_common``'s.
"""
import triton
import triton.language as tl

from ..triton_common import (columns, load_tile, row_sum)

__all__ = ['project_kernel', 'project_backward_kernel', 'pool_merge_kernel', 'fold_kernel']


@triton.jit
def _whole_rows_times(xo, xo_b, w_ptr, sw_o, sw_i, row0, cols, cmask, cols_b, cmask_b, outs,
                      omask, BE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """The normed rows ``xo`` (and ``xo_b``, BE > 0), in DTYPE, times
    w[row0 + outs, :]^T: one product per column block of the features. The
    tiles load transposed: ``_times_wt`` of ``_weight_rows`` (the backward's
    layout) spilled at M3's 32-row tiles, where this spills none."""
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
    loop over the features for both spilled at M4's 32-row tiles
    (docs/notes/benchmarks.md#two-column-blocks-at-m4s-width-machine-i)."""
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
    y_rstd = tl.math.rsqrt(row_sum(y * y, y_b * y_b, BHE) / HD + eps)
    gamma = tl.load(gamma_ptr + row * sg_h + hcols * sg_d, mask=hmask, other=0.0)
    out = y * y_rstd[:, None] * gamma[None, :]
    out_b = out
    if BHE > 0:
        gamma_b = tl.load(gamma_ptr + row * sg_h + hcols_b * sg_d, mask=hmask_b, other=0.0)
        out_b = y_b * y_rstd[:, None] * gamma_b[None, :]
    return out, out_b


@triton.jit
def _load_rows(base, rows, s_n, cols, s_d, rmask, cmask, cols_b, cmask_b, BE: tl.constexpr):
    """(BM, ...) rows at ``base`` as float32, both column blocks (BE 0:
    the first again), as ``_store_rows`` stores them."""
    y = load_tile(base, rows, s_n, cols, s_d, rmask[:, None] & cmask[None, :])
    y_b = y
    if BE > 0:
        y_b = load_tile(base, rows, s_n, cols_b, s_d, rmask[:, None] & cmask_b[None, :])
    return y, y_b


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
def _projection_program(C, U, L, D, HD, H, groups, group_rows, BD: tl.constexpr,
                        BE: tl.constexpr, BHD: tl.constexpr, BHE: tl.constexpr,
                        BH: tl.constexpr):
    """A projection kernel's program, one of ``groups`` per (image, chunk),
    each taking ``group_rows`` of its rows: its (image, chunk) index, chunk
    c of C, image b, whether the chunk writes (c < U), its first row, its
    group and the group's rows [r_start, r_end), and the column blocks with
    their masks (``columns``) of x (BD, BE), of one head (BHD, BHE) and of
    the step sizes (BH)."""
    pid = tl.program_id(0) // groups
    group = tl.program_id(0) % groups
    c = pid % C
    r_start = group * group_rows
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
    hcols, hmask, hcols_b, hmask_b = columns(HD, BHD, BHE)
    lcols = tl.arange(0, BH)
    return (pid, c, (pid // C).to(tl.int64), c < U, c.to(tl.int64) * L, group, r_start,
            tl.minimum(r_start + group_rows, L), cols, cmask, cols_b, cmask_b, hcols, hmask,
            hcols_b, hmask_b, lcols, lcols < H)


@triton.jit
def project_kernel(x_ptr, w_ptr, wq_ptr, bias_ptr, gamma_ptr,
                   q_ptr, k_ptr, v_ptr, lr_ptr, pool_ptr, lse_ptr,
                   N, L, C, U, D, H, HD, max_lr, eps, groups, group_rows,
                   sx_b, sx_n, sx_d, sw_o, sw_i, sg_h, sg_d,
                   sq_b, sq_n, sq_h, sq_d,
                   sk_b, sk_n, sk_h, sk_d,
                   sv_b, sv_n, sv_d,
                   sl_b, sl_n, sl_h,
                   ss_b, ss_u, ss_g, ss_d,
                   BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BHD: tl.constexpr,
                   BH: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
                   QDTYPE: tl.constexpr, QPREC: tl.constexpr, QBK: tl.constexpr,
                   BE: tl.constexpr = 0, BHE: tl.constexpr = 0):
    """The projections of (a group of rows of) one (image, chunk) of L
    tokens, C chunks per image (the last partial): x / rms(x) once per block
    of rows, each head's
    queries RMS-normed with its gain; for the U written chunks also keys
    (likewise), values, the step sizes ``max_lr * sigmoid`` and the pool's
    softmax over the chunk's rows, online (a running max and sum per
    feature), so the chunk's pooled rows need no second pass; the pool's
    log-sum-exp per feature is stored for the backward. ``w`` (4D + H, D)
    is the folded weight (``project.weights.fold``), in DTYPE; its products
    take BK features at a time (``_rows_times``). The queries' product
    reads ``wq`` (w in QDTYPE, w's strides) at QPREC, QBK features at a time
    (exact queries: float32 beside 16-bit others). BE > 0 (BHE > 0): rows
    (a head's columns) in two column blocks (``columns``). With ``groups``
    programs per (image, chunk), each takes ``group_rows`` of its rows and
    stores its own pooled rows and log-sum-exp (at ``ss_g`` apart), which
    the caller merges."""
    _, c, b, written, first, group, r_start, r_end, cols, cmask, cols_b, cmask_b, hcols, \
        hmask, hcols_b, hmask_b, lcols, lmask = _projection_program(
            C, U, L, D, HD, H, groups, group_rows, BD, BE, BHD, BHE, BH)
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
    for r0 in range(r_start, r_end, BM):
        i = r0 + tl.arange(0, BM)
        rmask = (i < r_end) & (first + i < N)
        x_rows = x_base + i * sx_n
        x, x_b = _load_rows(x_base, i, sx_n, cols, sx_d, rmask, cmask, cols_b, cmask_b, BE)
        rstd = tl.math.rsqrt(row_sum(x * x, x_b * x_b, BE) / D + eps)
        normed = x * rstd[:, None]
        normed_b = x_b * rstd[:, None]
        xo = normed.to(DTYPE)
        xo_b = normed_b.to(DTYPE)
        for head in range(0, H):
            q, q_b = _normed_head(normed.to(QDTYPE), normed_b.to(QDTYPE), x_rows, sx_d, rstd,
                                  rmask, D, wq_ptr, sw_o, sw_i, gamma_ptr, sg_h, sg_d, head, HD,
                                  cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b, hmask_b,
                                  eps, BM, BD, BE, QBK, BHD, BHE, QDTYPE, QPREC)
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
        pool_at = b * ss_b + c.to(tl.int64) * ss_u + group * ss_g
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
def _head_cotangent(bar_rows, sb_d, hcols, hmask, rmask, gamma_ptr, sg_h, sg_d, row):
    """One column block of a head's cotangent (``bar_rows``, (BM, 1)
    pointers) and of its gain row."""
    bar = tl.load(bar_rows + hcols[None, :] * sb_d, mask=rmask[:, None] & hmask[None, :],
                  other=0.0)
    return bar, tl.load(gamma_ptr + row * sg_h + hcols * sg_d, mask=hmask, other=0.0)


@triton.jit
def _gain_backward(bar_rows, sb_d, hcols, hmask, rmask, normed, gamma_ptr, sg_h, sg_d, gg_ptr,
                   row, HD):
    """One column block of a head's cotangent (``bar_rows``, (BM, 1)
    pointers) back through its gain: stores the gain's partial sum and
    returns the cotangent times the gain."""
    bar, gamma = _head_cotangent(bar_rows, sb_d, hcols, hmask, rmask, gamma_ptr, sg_h, sg_d,
                                 row)
    tl.store(gg_ptr + row * HD + hcols, tl.sum(bar * normed, axis=0), mask=hmask)
    return bar * gamma[None, :]


@triton.jit
def _head_block_sums(xo, xo_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h, sg_d, bar_rows, sb_d, rmask,
                     row, HD, outs, omask, cols, cmask, cols_b, cmask_b, BE: tl.constexpr,
                     DTYPE: tl.constexpr, PREC: tl.constexpr):
    """A head's columns ``outs`` (one block of them): their product y and
    its row sums of y * y and of cotangent * gain * y, the statistics of
    the head's RMSNorm and of its backward."""
    w, w_b = _weight_rows(w_ptr, sw_o, sw_i, row * HD, outs, omask, cols, cmask, cols_b,
                          cmask_b, BE, DTYPE)
    y = _times_wt(xo, xo_b, w, w_b, BE, PREC)
    bar, gamma = _head_cotangent(bar_rows, sb_d, outs, omask, rmask, gamma_ptr, sg_h, sg_d, row)
    return tl.sum(y * y, axis=1), tl.sum(bar * gamma[None, :] * y, axis=1)


@triton.jit
def _head_block_backward(xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr,
                         sg_h, sg_d, bar_rows, sb_d, gp_rows, sgp_f, gg_ptr, row, HD, outs,
                         omask, cols, cmask, cols_b, cmask_b, y_rstd, mean, BE: tl.constexpr,
                         DTYPE: tl.constexpr, PREC: tl.constexpr):
    """A head's columns ``outs`` backward, given its RMSNorm's ``y_rstd``
    and ``mean`` (``_head_block_sums`` of every block): recomputes their
    product, stores their product gradient and gain sums, and returns
    ``bar_n`` plus their product with the weight rows."""
    w, w_b = _weight_rows(w_ptr, sw_o, sw_i, row * HD, outs, omask, cols, cmask, cols_b,
                          cmask_b, BE, DTYPE)
    normed = _times_wt(xo, xo_b, w, w_b, BE, PREC) * y_rstd[:, None]
    bar = _gain_backward(bar_rows, sb_d, outs, omask, rmask, normed, gamma_ptr, sg_h, sg_d,
                         gg_ptr, row, HD)
    bar_y = y_rstd[:, None] * (bar - normed * mean[:, None])
    _store_product_grad(gp_rows, sgp_f, row * HD + outs, rmask, omask, bar_y, rstd, DTYPE)
    return _plus_times_w(bar_y, w, w_b, bar_n, bar_n_b, BE, DTYPE, PREC)


@triton.jit
def _head_backward_blocks(xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr,
                          sg_h, sg_d, bar_rows, sb_d, gp_rows, sgp_f, gg_ptr, row, HD, cols,
                          cmask, cols_b, cmask_b, eps, BE: tl.constexpr, BO: tl.constexpr,
                          DTYPE: tl.constexpr, PREC: tl.constexpr):
    """``_head_backward`` over the head's columns in blocks of BO: a first
    pass sums the RMSNorm's statistics, a second recomputes each block's
    product for its backward, so that no (HD, d) weight tile is held."""
    squares = tl.zeros_like(rstd)
    dots = tl.zeros_like(rstd)
    for o0 in range(0, HD, BO):
        outs = o0 + tl.arange(0, BO)
        block_squares, block_dots = _head_block_sums(
            xo, xo_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h, sg_d, bar_rows, sb_d, rmask, row, HD,
            outs, outs < HD, cols, cmask, cols_b, cmask_b, BE, DTYPE, PREC)
        squares += block_squares
        dots += block_dots
    y_rstd = tl.math.rsqrt(squares / HD + eps)
    mean = y_rstd * dots / HD  # of cotangent * gain * normed, as _head_backward's
    for o0 in range(0, HD, BO):
        outs = o0 + tl.arange(0, BO)
        bar_n, bar_n_b = _head_block_backward(
            xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h, sg_d,
            bar_rows, sb_d, gp_rows, sgp_f, gg_ptr, row, HD, outs, outs < HD, cols, cmask,
            cols_b, cmask_b, y_rstd, mean, BE, DTYPE, PREC)
    return bar_n, bar_n_b


@triton.jit
def _head_backward(xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h,
                   sg_d, bar_rows, sb_d, gp_rows, sgp_f, gg_ptr, row, HD, cols, cmask, cols_b,
                   cmask_b, hcols, hmask, hcols_b, hmask_b, eps, BE: tl.constexpr,
                   BHE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
                   BO: tl.constexpr):
    """One head's queries or keys backward: from their cotangent (rows at
    ``bar_rows``, (BM, 1) pointers) through the gain and the per-head
    RMSNorm to the product's output; stores it times the rows' rstd into the
    product-gradient rows ``gp_rows`` and the gain's partial sum at
    ``gg_ptr``; returns ``bar_n`` plus its product with the head's weight
    rows. The rows' features in one or two column blocks (BE), the head's
    columns too (BHE). BO > 0 and a head in two blocks: ``_head_backward_blocks``
    (in one block of up to 128 columns it compiles without spills as it is)."""
    if BO > 0 and BHE > 0:
        return _head_backward_blocks(xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i,
                                     gamma_ptr, sg_h, sg_d, bar_rows, sb_d, gp_rows, sgp_f,
                                     gg_ptr, row, HD, cols, cmask, cols_b, cmask_b, eps, BE, BO,
                                     DTYPE, PREC)
    w, w_b = _weight_rows(w_ptr, sw_o, sw_i, row * HD, hcols, hmask, cols, cmask, cols_b,
                          cmask_b, BE, DTYPE)
    y = _times_wt(xo, xo_b, w, w_b, BE, PREC)
    y_b, wh, wh_b = y, w, w_b
    if BHE > 0:
        wh, wh_b = _weight_rows(w_ptr, sw_o, sw_i, row * HD, hcols_b, hmask_b, cols, cmask,
                                cols_b, cmask_b, BE, DTYPE)
        y_b = _times_wt(xo, xo_b, wh, wh_b, BE, PREC)
    y_rstd = tl.math.rsqrt(row_sum(y * y, y_b * y_b, BHE) / HD + eps)
    normed = y * y_rstd[:, None]
    normed_b = y_b * y_rstd[:, None]
    bar = _gain_backward(bar_rows, sb_d, hcols, hmask, rmask, normed, gamma_ptr, sg_h, sg_d,
                         gg_ptr, row, HD)
    bar_b = bar
    if BHE > 0:
        bar_b = _gain_backward(bar_rows, sb_d, hcols_b, hmask_b, rmask, normed_b, gamma_ptr,
                               sg_h, sg_d, gg_ptr, row, HD)
    mean = row_sum(bar * normed, bar_b * normed_b, BHE) / HD
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
def _values_pool_blocks(xo, xo_b, x_base, i, sx_n, sx_d, rstd, rmask, bar_n, bar_n_b, w_ptr,
                        sw_o, sw_i, bias_ptr, v_rows, sv_h, sv_d, pool_ptr, lse_ptr, pool_at,
                        ss_d, bpool_ptr, bpool_at, sp_d, gp_rows, sgp_f, gb_block, gx_base,
                        sgx_n, sgx_d, D, HD, cols, cmask, cols_b, cmask_b, BE: tl.constexpr,
                        BO: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """``_values_pool_backward`` over the features in blocks of BO, each
    block's normed rows reloaded from x: holds (BO, d) weight tiles, not
    (d, d). The pool's direct terms are parked in x's gradient rows
    (``gx_base``) and added back after the step sizes' product, before
    the heads'."""
    for o0 in range(0, D, BO):
        outs = o0 + tl.arange(0, BO)
        omask = outs < D
        ro = rmask[:, None] & omask[None, :]
        normed = load_tile(x_base, i, sx_n, outs, sx_d, ro) * rstd[:, None]
        direct, bar_n, bar_n_b = _values_pool_backward(
            xo, xo_b, normed, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, bias_ptr, v_rows,
            sv_h, sv_d, pool_ptr, lse_ptr, pool_at, ss_d, bpool_ptr, bpool_at, sp_d, gp_rows,
            sgp_f, gb_block, D, HD, outs, omask, cols, cmask, cols_b, cmask_b, BE, DTYPE, PREC)
        tl.store(gx_base + i[:, None] * sgx_n + outs[None, :] * sgx_d, direct, mask=ro)
    return bar_n, bar_n_b


@triton.jit
def project_backward_kernel(x_ptr, w_ptr, bias_ptr, gamma_ptr, pool_ptr, lse_ptr,
                            bq_ptr, bk_ptr, bv_ptr, blr_ptr, bpool_ptr,
                            gx_ptr, gp_ptr, gg_ptr, gb_ptr,
                            N, L, C, U, D, H, HD, max_lr, eps, row_blocks, groups,
                            group_rows,
                            sx_b, sx_n, sx_d, sw_o, sw_i, sg_h, sg_d, ss_b, ss_u, ss_d,
                            sq_b, sq_n, sq_h, sq_d,
                            sk_b, sk_n, sk_h, sk_d,
                            sv_b, sv_n, sv_h, sv_d,
                            sl_b, sl_n, sl_h,
                            sp_b, sp_u, sp_d,
                            sgx_b, sgx_n, sgx_d, sgp_b, sgp_n, sgp_f,
                            BM: tl.constexpr, BD: tl.constexpr, BHD: tl.constexpr,
                            BH: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
                            BE: tl.constexpr = 0, BHE: tl.constexpr = 0,
                            BO: tl.constexpr = 0):
    """``project_kernel``'s backward for (a group of rows of) one (image,
    chunk), rows of BD columns (and BE for a second column block; a head's
    columns BHD and BHE), each product over whole rows of inputs: recomputes
    each product, takes the cotangents of the
    queries, keys, values, step sizes and pooled rows back through the
    gains, the per-head RMSNorms, the sigmoid and the pool's softmax (from
    the forward's log-sum-exp and pooled rows) to the product's output
    ``dy``, and from there to x through the RMSNorm. Writes x's gradient,
    ``dy`` times the rows' rstd into ``gp`` (B, N, 4D + H) in DTYPE (the
    weight's gradient is one product of it with x, outside), and per block of
    rows the gains' and the biases' partial sums (``gg``, ``gb``). BO > 0:
    the values' and pool logits' products, and those of a head held in two
    column blocks (BHE > 0), take BO output features at a time
    (``_values_pool_blocks``, ``_head_backward_blocks``): whole (d, d)
    weight tiles spilled at 255 registers. The written rows' terms
    come before the heads': fewer tiles live across the heads' loop, fewer
    spills. With ``groups`` programs per (image, chunk), each takes
    ``group_rows`` of its rows (a multiple of BM)."""
    pid, c, b, written, first, _, r_start, r_end, cols, cmask, cols_b, cmask_b, hcols, hmask, \
        hcols_b, hmask_b, lcols, lmask = _projection_program(
            C, U, L, D, HD, H, groups, group_rows, BD, BE, BHD, BHE, BH)
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
    for r0 in range(r_start, r_end, BM):
        i = r0 + tl.arange(0, BM)
        rmask = (i < r_end) & (first + i < N)
        x, x_b = _load_rows(x_base, i, sx_n, cols, sx_d, rmask, cmask, cols_b, cmask_b, BE)
        rstd = tl.math.rsqrt(row_sum(x * x, x_b * x_b, BE) / D + eps)
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
        if written:
            gb_block = gb_ptr + block * (D + H)
            v_rows = v_base + i * sv_n
            if BO > 0:
                bar_n, bar_n_b = _values_pool_blocks(
                    xo, xo_b, x_base, i, sx_n, sx_d, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o,
                    sw_i, bias_ptr, v_rows, sv_h, sv_d, pool_ptr, lse_ptr, pool_at, ss_d,
                    bpool_ptr, bpool_at, sp_d, gp_rows, sgp_f, gb_block, gx_base, sgx_n, sgx_d,
                    D, HD, cols, cmask, cols_b, cmask_b, BE, BO, DTYPE, PREC)
            else:
                direct, bar_n, bar_n_b = _values_pool_backward(
                    xo, xo_b, normed, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, bias_ptr,
                    v_rows, sv_h, sv_d, pool_ptr, lse_ptr, pool_at, ss_d, bpool_ptr, bpool_at,
                    sp_d, gp_rows, sgp_f, gb_block, D, HD, cols, cmask, cols, cmask, cols_b,
                    cmask_b, BE, DTYPE, PREC)
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
            if BO > 0:  # the parked direct terms, stored by other threads
                tl.debug_barrier()
                direct, direct_b = _load_rows(gx_base, i, sgx_n, cols, sgx_d, rmask, cmask,
                                              cols_b, cmask_b, BE)
                bar_n += direct
                if BE > 0:
                    bar_n_b += direct_b
        for head in range(0, H):
            bar_n, bar_n_b = _head_backward(
                xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h, sg_d,
                q_base + i[:, None] * sq_n + head * sq_h, sq_d, gp_rows, sgp_f, gg_block, head,
                HD, cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b, hmask_b, eps, BE, BHE,
                DTYPE, PREC, BO)
            if written:
                bar_n, bar_n_b = _head_backward(
                    xo, xo_b, rstd, rmask, bar_n, bar_n_b, w_ptr, sw_o, sw_i, gamma_ptr, sg_h,
                    sg_d, k_base + i[:, None] * sk_n + head * sk_h, sk_d, gp_rows, sgp_f,
                    gg_block, H + head, HD, cols, cmask, cols_b, cmask_b, hcols, hmask, hcols_b,
                    hmask_b, eps, BE, BHE, DTYPE, PREC, BO)
        if BO > 0:  # every parked term loaded back before x's gradient overwrites it
            tl.debug_barrier()
        # x / rms(x): bar_x = rstd (bar_n - n mean(bar_n n))
        mean = row_sum(bar_n * normed, bar_n_b * normed_b, BE) / D
        _store_rows(gx_base, i, sgx_n, cols, sgx_d,
                    rstd[:, None] * (bar_n - normed * mean[:, None]), rmask, cmask,
                    rstd[:, None] * (bar_n_b - normed_b * mean[:, None]), cols_b, cmask_b, BE)


@triton.jit
def pool_merge_kernel(pool_ptr, lse_ptr, pooled_ptr, out_lse_ptr, G, D, BD: tl.constexpr):
    """One (image, chunk)'s BD features of its G row groups' pooled rows and
    log-sum-exps, (G, D) each, merged by their log-sum-exps: the chunk's
    log-sum-exp and its pooled row, (D). Every tensor contiguous."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = cols < D
    groups = row * G * D + cols
    top = tl.full((BD, ), float('-inf'), dtype=tl.float32)
    for g in range(0, G):
        top = tl.maximum(top, tl.load(lse_ptr + groups + g * D, mask=mask, other=0.0))
    # every group at -inf (no row): -inf, as logsumexp gives, not -inf - -inf
    top = tl.where(top == float('-inf'), 0.0, top)
    total = tl.zeros((BD, ), dtype=tl.float32)
    acc = tl.zeros((BD, ), dtype=tl.float32)
    for g in range(0, G):
        share = tl.exp(tl.load(lse_ptr + groups + g * D, mask=mask, other=0.0) - top)
        total += share
        acc += share * tl.load(pool_ptr + groups + g * D, mask=mask, other=0.0)
    tl.store(out_lse_ptr + row * D + cols, top + tl.log(total), mask=mask)
    tl.store(pooled_ptr + row * D + cols, acc / total, mask=mask)


@triton.jit
def fold_kernel(rn_ptr, sn_ptr, q_ptr, k_ptr, v_ptr, l_ptr, lb_ptr, t_ptr, tb_ptr, qg_ptr,
                kg_ptr, w_ptr, b_ptr, g_ptr, D, H, HD,
                s_rn, s_sn, sq_o, sq_i, sk_o, sk_i, sv_o, sv_i, sl_o, sl_i, s_lb, st_o, st_i,
                s_tb, sqg_h, sqg_d, skg_h, skg_d, sw_o, sw_i,
                BD: tl.constexpr, BHD: tl.constexpr):
    """Row ``pid`` of the folded weight (4D + H, D), in its dtype: its
    layer's row times its norm's weight (``project.weights.fold``); the
    first D + H programs also write an entry of the bias (the logits' and
    the step sizes'), the first 2H a row of the gains (1 + gamma)."""
    o = tl.program_id(0)
    cols = tl.arange(0, BD)
    cmask = cols < D
    if o < D:
        row = tl.load(q_ptr + o * sq_o + cols * sq_i, mask=cmask, other=0.0)
        norm = tl.load(rn_ptr + cols * s_rn, mask=cmask, other=0.0)
    else:
        norm = tl.load(sn_ptr + cols * s_sn, mask=cmask, other=0.0)
        if o < 2 * D:
            row = tl.load(k_ptr + (o - D) * sk_o + cols * sk_i, mask=cmask, other=0.0)
        elif o < 3 * D:
            row = tl.load(v_ptr + (o - 2 * D) * sv_o + cols * sv_i, mask=cmask, other=0.0)
        elif o < 4 * D:
            row = tl.load(l_ptr + (o - 3 * D) * sl_o + cols * sl_i, mask=cmask, other=0.0)
        else:
            row = tl.load(t_ptr + (o - 4 * D) * st_o + cols * st_i, mask=cmask, other=0.0)
    tl.store(w_ptr + o * sw_o + cols * sw_i, (row * norm).to(w_ptr.dtype.element_ty),
             mask=cmask)
    if o < D:
        tl.store(b_ptr + o, tl.load(lb_ptr + o * s_lb))
    elif o < D + H:
        tl.store(b_ptr + o, tl.load(tb_ptr + (o - D) * s_tb))
    hcols = tl.arange(0, BHD)
    hmask = hcols < HD
    if o < H:
        gain = tl.load(qg_ptr + o * sqg_h + hcols * sqg_d, mask=hmask, other=0.0)
        tl.store(g_ptr + o * HD + hcols, 1.0 + gain, mask=hmask)
    elif o < 2 * H:
        gain = tl.load(kg_ptr + (o - H) * skg_h + hcols * skg_d, mask=hmask, other=0.0)
        tl.store(g_ptr + o * HD + hcols, 1.0 + gain, mask=hmask)
