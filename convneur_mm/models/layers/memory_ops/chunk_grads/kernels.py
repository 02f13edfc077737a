"""The chunk gradients' Triton kernels (imports triton): the write gradient's
rows and columns passes, the one program per chunk that runs both, and their
backward kernels. Their launchers are in ``chunk_grads.triton``.

Import this module only through ``kernels.availability.load_kernels('chunk_grads')``
(``TRITON_INTERPRET=1`` must be set before it is first imported). The
conventions they share (operand dtypes, column blocks, tiles, addressing)
are ``triton_common``'s.
"""
import triton
import triton.language as tl

from ..triton_common import (GELU_CUBIC, INV_SQRT_2PI, SQRT_2_PI, cols_rows, columns, gelu,
                             gelu_grad, hidden_block, layer_norm_rows, ln_backward_rows, load_tile,
                             mlp_rows, pre_block, row_sum, store_weight_grads, tanh_form,
                             times_w1t, times_w2t, weight_tiles)

__all__ = ['grads_rows_kernel', 'grads_cols_kernel', 'grads_chunk_kernel',
           'grads_backward_rows_kernel', 'grads_backward_cols_kernel',
           'grads_backward_chunk_kernel']


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
    d_hidden, d_hidden_b, ln_y = ln_backward_rows(d_normed, normed, d_normed_b, normed_b, rstd,
                                                   D, BE)
    d_hidden = tl.where(mask, d_hidden, 0.0)
    if BE > 0:
        d_hidden_b = tl.where(mask_b, d_hidden_b, 0.0)
    return (resid, d_out, d_normed, d_hidden, resid_b, d_out_b, d_normed_b, d_hidden_b, ln_y)


@triton.jit
def _chunk_of(chunk, C, U):
    """(gi, c, bi, ci) of a write's ``chunk`` = gi * C + c, int64: chunk c of
    group gi is chunk ci of image bi (U per image)."""
    c = (chunk % C).to(tl.int64)
    return (chunk // C).to(tl.int64), c, c // U, c % U


@triton.jit
def _write_inputs(k_base, v_base, k_rows, v_rows, sk_d, sv_d, g_base, sg_d, cols, cmask, mask):
    """A write's keys, values and gain 1 + g at one column block (``k_rows``,
    ``v_rows``: the rows' offsets)."""
    k = load_tile(k_base, k_rows, 1, cols, sk_d, mask)
    v = load_tile(v_base, v_rows, 1, cols, sv_d, mask)
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
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
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
    y, y_b = mlp_rows(k, k_b, w1_ptr + gi * s1_g, w2_ptr + gi * s2_g, s1_d, s1_k, s2_k, s2_d,
                       w1_ptr, w2_ptr, 0, 0, 0, 0, 1.0, D, HID, BM, BD, BE, BH, DTYPE, PREC,
                       False, PREC, GELU_TANH)
    normed, normed_b, rstd = layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE)
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
    BE > 0: the columns in two blocks (``columns``).
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
        cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
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
        chunk, hid, hmask = hidden_block(pid, hidden_blocks, HID, BH)
        gi, c, bi, ci = _chunk_of(chunk, C, U)
        _write_cols(k_ptr + (gi * sk_g + bi * sk_b + ci * sk_c), dh_ptr, w1_ptr + gi * s1_g,
                    w2_ptr + gi * s2_g, g1_ptr, g2_ptr, chunk.to(tl.int64), sk_l, sk_d, s1_d, s1_k,
                    s2_k, s2_d, hid, hmask, L, D, HID, loss_scale, BM, BD, BE, BH,
                    DTYPE, PREC, TAIL, GELU_TANH)


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
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
    w1, w2t = weight_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols, cmask, hid, hmask)
    w1 = w1.to(DTYPE)
    w2t = w2t.to(DTYPE)
    acc1 = tl.zeros((BD, BH), dtype=tl.float32)
    acc2 = tl.zeros((BH, BD), dtype=tl.float32)
    w1_b = w1
    w2t_b = w2t
    acc1_b = acc1
    acc2_b = acc2
    if BE > 0:
        w1_b, w2t_b = weight_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols_b, cmask_b, hid,
                                    hmask)
        w1_b = w1_b.to(DTYPE)
        w2t_b = w2t_b.to(DTYPE)
        acc1_b = tl.zeros((BE, BH), dtype=tl.float32)
        acc2_b = tl.zeros((BH, BE), dtype=tl.float32)
    dh_base = dh_ptr + chunk * L * D
    whole = L // BM * BM if TAIL < BM else L
    for r0 in range(0, whole, BM):
        acc1, acc2, acc1_b, acc2_b = cols_rows(
            k_base, dh_base, sk_l, sk_d, r0, 0, L, L, D, cols, cmask, cols_b, cmask_b, w1, w2t,
            w1, w2t, w1_b, w2t_b, w1_b, w2t_b, acc1, acc2, acc1_b, acc2_b, BM, BE, DTYPE,
            PREC, False, PREC, GELU_TANH)
    if TAIL < BM:  # the rows past the whole blocks, TAIL at a time: 196 take 208, not 256
        for r0 in range(whole, L, TAIL):
            acc1, acc2, acc1_b, acc2_b = cols_rows(
                k_base, dh_base, sk_l, sk_d, r0, 0, L, L, D, cols, cmask, cols_b, cmask_b, w1,
                w2t, w1, w2t, w1_b, w2t_b, w1_b, w2t_b, acc1, acc2, acc1_b, acc2_b, TAIL, BE,
                DTYPE, PREC, False, PREC, GELU_TANH)

    out = chunk * D * HID
    store_weight_grads(g1_ptr, g2_ptr, out, acc1, acc2, loss_scale, D, HID, cols, cmask, hid,
                        hmask)
    if BE > 0:
        store_weight_grads(g1_ptr, g2_ptr, out, acc1_b, acc2_b, loss_scale, D, HID, cols_b,
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
        cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
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
        s, du = tanh_form(x)
        return s * (1.0 - s) * 2.0 * (du * 2.0 + x * (1.0 - s * 2.0) * du * du * 2.0 +
                                      x * x * SQRT_2_PI * GELU_CUBIC * 6.0)
    # gelu''(x) = phi(x) (2 - x^2)
    return tl.exp(-0.5 * x * x) * INV_SQRT_2PI * (2.0 - x * x)


@triton.jit
def _write_backward_inputs(k_base, v_base, rows, sk_l, sk_d, sv_l, sv_d, g_base, sg_d, bg_base,
                           sbg_d, cols, cmask, mask):
    """A chunk-gradient backward block's keys, values, gain 1 + g and g's
    cotangent at one column block."""
    k = load_tile(k_base, rows, sk_l, cols, sk_d, mask)
    v = load_tile(v_base, rows, sv_l, cols, sv_d, mask)
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
    column blocks (``columns``)."""
    rows = r0 + tl.arange(0, BM)
    rmask = rows < L
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
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
    y, y_b = mlp_rows(k, k_b, w1, w2, s1_d, s1_k, s2_k, s2_d, w1, w2, 0, 0, 0, 0, 1.0, D, HID,
                       BM, BD, BE, BH, DTYPE, PREC, False, PREC, GELU_TANH)
    normed, normed_b, rstd = layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE)
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
        pre = pre_block(k, ko, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols, cmask, hid, HID, DTYPE,
                         PREC, False, PREC)
        back = times_w2t(d_hidden, dho, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols, cmask, hid, HID,
                          DTYPE, PREC, False, PREC)
        bar_dp = pre_block(k, ko, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols, cmask, hid, HID,
                            DTYPE, PREC, False, PREC)
        if BE > 0:
            pre += pre_block(k_b, ko_b, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols_b, cmask_b, hid,
                              HID, DTYPE, PREC, False, PREC)
            back += times_w2t(d_hidden_b, dho_b, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols_b, cmask_b,
                               hid, HID, DTYPE, PREC, False, PREC)
            bar_dp += pre_block(k_b, ko_b, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols_b, cmask_b,
                                 hid, HID, DTYPE, PREC, False, PREC)
        grad = gelu_grad(pre, GELU_TANH)
        act = gelu(pre, GELU_TANH)
        gk += times_w1t(grad * back, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols, cmask, hid, HID,
                         DTYPE, PREC, False, PREC)
        bar_dh += _times_w2(grad * bar_dp, w2, s2_k, s2_d, cols, cmask, hid, HID, DTYPE, PREC)
        bar_dh += _times_w2(act, bw2, sb2_k, sb2_d, cols, cmask, hid, HID, DTYPE, PREC)
        if BE > 0:
            gk_b += times_w1t(grad * back, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols_b, cmask_b,
                               hid, HID, DTYPE, PREC, False, PREC)
            bar_dh_b += _times_w2(grad * bar_dp, w2, s2_k, s2_d, cols_b, cmask_b, hid, HID, DTYPE,
                                  PREC)
            bar_dh_b += _times_w2(act, bw2, sb2_k, sb2_d, cols_b, cmask_b, hid, HID, DTYPE, PREC)

    # the (rows, D) chain back to R, N and H; LNback is its own adjoint
    bar_dn, bar_dn_b, ln_bar = ln_backward_rows(bar_dh, normed, bar_dh_b, normed_b, rstd, D, BE)
    rstd_term = rstd * row_sum(bar_dh * d_hidden, bar_dh_b * d_hidden_b, BE) / D
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
    bar_lr = row_sum(bar_d * resid, bar_d_b * resid_b, BE) * (2.0 / D)
    tl.store(glr_ptr + chunk * L + rows, bar_lr, mask=rmask)
    bar_h, bar_h_b, _ = ln_backward_rows(bar_normed, normed, bar_normed_b, normed_b, rstd, D, BE)
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
        pre = pre_block(k, ko, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols, cmask, hid, HID, DTYPE,
                         PREC, False, PREC)
        back = times_w2t(d_hidden, dho, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols, cmask, hid, HID,
                          DTYPE, PREC, False, PREC)
        bar_dp = pre_block(k, ko, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols, cmask, hid, HID,
                            DTYPE, PREC, False, PREC)
        bar_act = times_w2t(d_hidden, dho, bw2, sb2_k, sb2_d, bw2, 0, 0, 1.0, cols, cmask, hid,
                             HID, DTYPE, PREC, False, PREC)
        bar_act += times_w2t(bar_h, bho, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols, cmask, hid, HID,
                              DTYPE, PREC, False, PREC)
        if BE > 0:
            pre += pre_block(k_b, ko_b, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols_b, cmask_b, hid,
                              HID, DTYPE, PREC, False, PREC)
            back += times_w2t(d_hidden_b, dho_b, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols_b, cmask_b,
                               hid, HID, DTYPE, PREC, False, PREC)
            bar_dp += pre_block(k_b, ko_b, bw1, sb1_d, sb1_k, bw1, 0, 0, 1.0, cols_b, cmask_b,
                                 hid, HID, DTYPE, PREC, False, PREC)
            bar_act += times_w2t(d_hidden_b, dho_b, bw2, sb2_k, sb2_d, bw2, 0, 0, 1.0, cols_b,
                                  cmask_b, hid, HID, DTYPE, PREC, False, PREC)
            bar_act += times_w2t(bar_h_b, bho_b, w2, s2_k, s2_d, w2, 0, 0, 1.0, cols_b, cmask_b,
                                  hid, HID, DTYPE, PREC, False, PREC)
        bar_pre = (gelu_grad(pre, GELU_TANH) * bar_act +
                   _gelu_second(pre, GELU_TANH) * back * bar_dp)
        gk += times_w1t(bar_pre, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols, cmask, hid, HID, DTYPE,
                         PREC, False, PREC)
        if BE > 0:
            gk_b += times_w1t(bar_pre, w1, s1_d, s1_k, w1, 0, 0, 1.0, cols_b, cmask_b, hid, HID,
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
    grad = gelu_grad(pre, GELU_TANH)
    bar_pre = (grad * bar_act + _gelu_second(pre, GELU_TANH) * back * bar_dp).to(DTYPE)
    d_act = (grad * bar_dp).to(DTYPE)
    act = gelu(pre, GELU_TANH).to(DTYPE)
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
                               C, U, L, D, HID, hidden_blocks, chunk_blocks, chunks_per_program,
                               sk_g, sk_b, sk_c, sk_l, sk_d,
                               s1_g, s1_d, s1_k,
                               s2_g, s2_k, s2_d,
                               sb1_g, sb1_c, sb1_d, sb1_k,
                               sb2_g, sb2_c, sb2_k, sb2_d,
                               BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                               DTYPE: tl.constexpr, PREC: tl.constexpr, TAIL: tl.constexpr,
                               ITERS: tl.constexpr = 1, GELU_TANH: tl.constexpr = False,
                               BE: tl.constexpr = 0):
    """The shared weights' gradients, per (block of ``chunks_per_program``
    chunks of a group, block of BH hidden units j): walks each chunk's rows,
    recomputes P_j, and writes the sum of its chunks' shares (summed over the
    blocks by the caller, in a fixed order)

        gw1[:, j] = K^T (gelu'(P_j) (Dh bW2[j]^T + bH w2[j]^T) + gelu''(P_j) B_j (K bW1[:, j]))
        gw2[j] = (gelu'(P_j) (K bW1[:, j]))^T Dh + gelu(P_j)^T bH,   B_j = Dh w2[j]^T,

    (G, chunk_blocks, D, HID) and (G, chunk_blocks, HID, D) float32."""
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        block, hid, hmask = hidden_block(pid, hidden_blocks, HID, BH)
        gi = block // chunk_blocks
        c0 = (block % chunk_blocks) * chunks_per_program
        w1, w2t, w1_b, w2t_b, acc1, acc2, acc1_b, acc2_b = _backward_cols_start(
            w1_ptr + gi * s1_g, w2_ptr + gi * s2_g, s1_d, s1_k, s2_k, s2_d, cols, cmask, cols_b,
            cmask_b, hid, hmask, BD, BE, BH, DTYPE)
        for i in range(c0, tl.minimum(c0 + chunks_per_program, C)):
            chunk = (gi * C + i).to(tl.int64)
            g64, c, bi, ci = _chunk_of(chunk, C, U)
            acc1, acc2, acc1_b, acc2_b = _backward_cols_chunk(
                k_ptr + (g64 * sk_g + bi * sk_b + ci * sk_c), dh_ptr, bh_ptr, w1, w2t, w1_b,
                w2t_b, bw1_ptr + g64 * sb1_g + c * sb1_c, bw2_ptr + g64 * sb2_g + c * sb2_c,
                chunk, sk_l, sk_d, sb1_d, sb1_k, sb2_k, sb2_d, cols, cmask, cols_b, cmask_b, hid,
                hmask, acc1, acc2, acc1_b, acc2_b, L, D, BM, BE, DTYPE, PREC, TAIL, GELU_TANH)
        _store_backward_cols(gw1_ptr, gw2_ptr, block.to(tl.int64) * D * HID, acc1, acc2,
                             acc1_b, acc2_b, D, HID, cols, cmask, cols_b, cmask_b, hid, hmask,
                             BE)


@triton.jit
def _operand_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols, cmask, hid, hmask,
                   DTYPE: tl.constexpr):
    """``weight_tiles`` (w1[cols, hid] and w2[hid, cols]^T) in DTYPE."""
    w1, w2t = weight_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols, cmask, hid, hmask)
    return w1.to(DTYPE), w2t.to(DTYPE)


@triton.jit
def _backward_cols_start(w1_ptr, w2_ptr, s1_d, s1_k, s2_k, s2_d, cols, cmask, cols_b, cmask_b,
                         hid, hmask, BD: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
                         DTYPE: tl.constexpr):
    """The shared weights' tiles at both column blocks, and the weights'
    gradients' zero accumulators, for the hidden units ``hid``."""
    w1, w2t = _operand_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols, cmask, hid, hmask,
                             DTYPE)
    acc1 = tl.zeros((BD, BH), dtype=tl.float32)
    acc2 = tl.zeros((BH, BD), dtype=tl.float32)
    w1_b = w1
    w2t_b = w2t
    acc1_b = acc1
    acc2_b = acc2
    if BE > 0:
        w1_b, w2t_b = _operand_tiles(w1_ptr, s1_d, s1_k, w2_ptr, s2_k, s2_d, cols_b, cmask_b,
                                     hid, hmask, DTYPE)
        acc1_b = tl.zeros((BE, BH), dtype=tl.float32)
        acc2_b = tl.zeros((BH, BE), dtype=tl.float32)
    return w1, w2t, w1_b, w2t_b, acc1, acc2, acc1_b, acc2_b


@triton.jit
def _backward_cols_chunk(k_base, dh_ptr, bh_ptr, w1, w2t, w1_b, w2t_b, bw1_ptr, bw2_ptr, chunk,
                         sk_l, sk_d, sb1_d, sb1_k, sb2_k, sb2_d, cols, cmask, cols_b, cmask_b,
                         hid, hmask, acc1, acc2, acc1_b, acc2_b, L, D, BM: tl.constexpr,
                         BE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr,
                         TAIL: tl.constexpr, GELU_TANH: tl.constexpr):
    """One chunk's shares of the weights' gradients at the hidden units
    ``hid``, added to the accumulators: chunk ``chunk`` (int64; ``k_base``
    its keys, ``bw1_ptr`` and ``bw2_ptr`` its cotangents) walked by its rows."""
    bw1, bw2t = _operand_tiles(bw1_ptr, sb1_d, sb1_k, bw2_ptr, sb2_k, sb2_d, cols, cmask, hid,
                               hmask, DTYPE)
    bw1_b = bw1
    bw2t_b = bw2t
    if BE > 0:
        bw1_b, bw2t_b = _operand_tiles(bw1_ptr, sb1_d, sb1_k, bw2_ptr, sb2_k, sb2_d, cols_b,
                                       cmask_b, hid, hmask, DTYPE)
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
    return acc1, acc2, acc1_b, acc2_b


@triton.jit
def _store_backward_cols(gw1_ptr, gw2_ptr, out, acc1, acc2, acc1_b, acc2_b, D, HID, cols, cmask,
                         cols_b, cmask_b, hid, hmask, BE: tl.constexpr):
    """The weights' gradients' shares at ``out`` (the element offset of their
    (D, HID) and (HID, D) slice), both column blocks."""
    store_weight_grads(gw1_ptr, gw2_ptr, out, acc1, acc2, 1.0, D, HID, cols, cmask, hid, hmask)
    if BE > 0:
        store_weight_grads(gw1_ptr, gw2_ptr, out, acc1_b, acc2_b, 1.0, D, HID, cols_b, cmask_b,
                            hid, hmask)


@triton.jit
def _write_backward_cols(k_base, dh_ptr, bh_ptr, w1_ptr, w2_ptr, bw1_ptr, bw2_ptr, gw1_ptr,
                         gw2_ptr, chunk, sk_l, sk_d, s1_d, s1_k, s2_k, s2_d, sb1_d, sb1_k, sb2_k,
                         sb2_d, hid, hmask, L, D, HID, BM: tl.constexpr,
                         BD: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
                         DTYPE: tl.constexpr, PREC: tl.constexpr, TAIL: tl.constexpr,
                         GELU_TANH: tl.constexpr):
    """``grads_backward_cols_kernel``'s work on the hidden units ``hid`` of
    the one chunk ``chunk`` (int64; ``k_base`` its keys, the weight pointers
    at its group and its cotangents): walks its rows and stores its shares."""
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
    w1, w2t, w1_b, w2t_b, acc1, acc2, acc1_b, acc2_b = _backward_cols_start(
        w1_ptr, w2_ptr, s1_d, s1_k, s2_k, s2_d, cols, cmask, cols_b, cmask_b, hid, hmask, BD, BE,
        BH, DTYPE)
    acc1, acc2, acc1_b, acc2_b = _backward_cols_chunk(
        k_base, dh_ptr, bh_ptr, w1, w2t, w1_b, w2t_b, bw1_ptr, bw2_ptr, chunk, sk_l, sk_d, sb1_d,
        sb1_k, sb2_k, sb2_d, cols, cmask, cols_b, cmask_b, hid, hmask, acc1, acc2, acc1_b,
        acc2_b, L, D, BM, BE, DTYPE, PREC, TAIL, GELU_TANH)
    _store_backward_cols(gw1_ptr, gw2_ptr, chunk * D * HID, acc1, acc2, acc1_b, acc2_b, D, HID,
                         cols, cmask, cols_b, cmask_b, hid, hmask, BE)


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
