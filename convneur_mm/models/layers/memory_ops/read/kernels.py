"""The read's Triton kernels (imports triton): the forward ``read_kernel``,
its backward's rows and columns passes, and both passes as one program per
state (``read_backward_chunk_kernel``, where chosen). Their launchers are in ``read.triton``.

Import this module only through ``kernels.availability.load_kernels('read')``
(``TRITON_INTERPRET=1`` must be set before it is first imported). The
conventions they share (operand dtypes, column blocks, tiles, addressing)
are ``triton_common``'s.
"""
import triton
import triton.language as tl

from ..triton_common import (cols_rows, columns, gelu_grad, hidden_block, layer_norm_rows,
                             ln_backward_rows, load_tile, mlp_rows, pre_block, store_weight_grads,
                             times_w1t, times_w2t, weight_tiles, whole_state)

__all__ = ['read_kernel', 'read_backward_rows_kernel', 'read_backward_cols_kernel',
           'read_backward_chunk_kernel']


@triton.jit
def _state_of(group, B, C):
    """(c, h, b, c64) of a read's state ``group`` = (h * B + b) * C + c: the
    chunk c as int32 (for row masks) and the int64 offsets' indices."""
    c = group % C
    hb = group // C
    return c, (hb // B).to(tl.int64), (hb % B).to(tl.int64), c.to(tl.int64)


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
    no copy. DECOMPOSED: see ``mlp_rows``; base weights per head, carry per
    (h, b, chunk). BE > 0: the columns in two blocks (``columns``)."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        rb = pid % row_blocks
        group = pid // row_blocks
        c, h, b, c64 = _state_of(group, B, C)

        rows = r0 + rb * BM + tl.arange(0, BM)  # within the chunk
        rmask = (rows < L) & (c * L + rows < N)
        cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
        mask = rmask[:, None] & cmask[None, :]
        mask_b = rmask[:, None] & cmask_b[None, :]
        first = c64 * L  # the chunk's first token

        x_base = x_ptr + (h * sx_h + b * sx_b + first * sx_n)
        x = load_tile(x_base, rows, sx_n, cols, sx_d, mask)
        x_b = x
        if BE > 0:
            x_b = load_tile(x_base, rows, sx_n, cols_b, sx_d, mask_b)
        carry = 1.0
        if DECOMPOSED:
            carry = tl.load(carry_ptr + (h * sc_h + b * sc_b + c64 * sc_c)).to(tl.float32)
        y, y_b = mlp_rows(x, x_b, w1_ptr + (h * s1_h + b * s1_b + c64 * s1_c),
                           w2_ptr + (h * s2_h + b * s2_b + c64 * s2_c), s1_d, s1_k, s2_k, s2_d,
                           b1_ptr + h * sb1_h, b2_ptr + h * sb2_h, sb1_d, sb1_k, sb2_k, sb2_d,
                           carry, D, HID, BM, BD, BE, BH, DTYPE, PREC, DECOMPOSED, BASE_PREC,
                           GELU_TANH)
        normed, normed_b, _ = layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE)
        g_base = g_ptr + (h * sg_h + b * sg_b + c64 * sg_c)
        o_base = out_ptr + (h * so_h + b * so_b + first * so_n)
        _read_out(x, normed, g_base, sg_d, o_base, rows, so_n, so_d, cols, cmask, mask)
        if BE > 0:
            _read_out(x_b, normed_b, g_base, sg_d, o_base, rows, so_n, so_d, cols_b, cmask_b,
                      mask_b)


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

    BE > 0: the columns in two blocks (``columns``)."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        rb = pid % row_blocks
        group = pid // row_blocks
        _rows_backward(x_ptr, go_ptr, w1_ptr, w2_ptr, g_ptr, gx_ptr, dy_ptr, dg_ptr,
                       rb, slot0, slots,
                       b1_ptr, b2_ptr, carry_ptr, group, r0,
                       B, C, N, L, D, HID, sx_h, sx_b, sx_n, sx_d, s1_h, s1_b, s1_c, s1_d, s1_k,
                       s2_h, s2_b, s2_c, s2_k, s2_d, sg_h, sg_b, sg_c, sg_d,
                       so_h, so_b, so_n, so_d, sgx_h, sgx_b, sgx_n, sgx_d,
                       sb1_h, sb1_d, sb1_k, sb2_h, sb2_k, sb2_d, sc_h, sc_b, sc_c, eps,
                       BM, BD, BH, DTYPE, PREC, DECOMPOSED, BASE_PREC, GELU_TANH, BE)


@triton.jit
def _rows_backward(x_ptr, go_ptr, w1_ptr, w2_ptr, g_ptr, gx_ptr, dy_ptr, dg_ptr, rb, slot0,
                   slots, b1_ptr, b2_ptr, carry_ptr, group, r0,
                   B, C, N, L, D, HID,
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
                   GELU_TANH: tl.constexpr, BE: tl.constexpr):
    """``read_backward_rows_kernel``'s work on block ``rb`` of BM rows from
    row ``r0`` of state ``group``'s chunk; its share of g's gradient goes to
    ``dg``'s slot ``slot0 + rb`` of the state's ``slots``. The row and slot
    offsets are formed here, next to their use: formed by the caller, the
    rows pass took 158 registers instead of 128 on sm_90."""
    c, h, b, c64 = _state_of(group, B, C)
    rows = r0 + rb * BM + tl.arange(0, BM)
    rmask = (rows < L) & (c * L + rows < N)
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
    hcols = tl.arange(0, BH)
    mask = rmask[:, None] & cmask[None, :]
    mask_b = rmask[:, None] & cmask_b[None, :]
    first = c64 * L

    x_base = x_ptr + (h * sx_h + b * sx_b + first * sx_n)
    go_base = go_ptr + (h * so_h + b * so_b + first * so_n)
    g_base = g_ptr + (h * sg_h + b * sg_b + c64 * sg_c)
    x = load_tile(x_base, rows, sx_n, cols, sx_d, mask)
    go = load_tile(go_base, rows, so_n, cols, so_d, mask)
    scale = 1.0 + tl.load(g_base + cols * sg_d, mask=cmask, other=0.0).to(tl.float32)
    x_b = x
    go_b = go
    scale_b = scale
    if BE > 0:
        x_b = load_tile(x_base, rows, sx_n, cols_b, sx_d, mask_b)
        go_b = load_tile(go_base, rows, so_n, cols_b, so_d, mask_b)
        scale_b = 1.0 + tl.load(g_base + cols_b * sg_d, mask=cmask_b,
                                other=0.0).to(tl.float32)
    carry = 1.0
    if DECOMPOSED:
        carry = tl.load(carry_ptr + (h * sc_h + b * sc_b + c64 * sc_c)).to(tl.float32)
    w1_base = w1_ptr + (h * s1_h + b * s1_b + c64 * s1_c)
    w2_base = w2_ptr + (h * s2_h + b * s2_b + c64 * s2_c)
    b1_base = b1_ptr + h * sb1_h
    b2_base = b2_ptr + h * sb2_h
    y, y_b = mlp_rows(x, x_b, w1_base, w2_base, s1_d, s1_k, s2_k, s2_d, b1_base, b2_base,
                       sb1_d, sb1_k, sb2_k, sb2_d, carry, D, HID, BM, BD, BE, BH, DTYPE, PREC,
                       DECOMPOSED, BASE_PREC, GELU_TANH)
    normed, normed_b, rstd = layer_norm_rows(y, y_b, cmask, cmask_b, D, eps, BE)
    dg_at = dg_ptr + (group.to(tl.int64) * slots + slot0 + rb) * D
    tl.store(dg_at + cols, tl.sum(go * normed, axis=0), mask=cmask)
    dy, dy_b, _ = ln_backward_rows(go * scale[None, :], normed, go_b * scale_b[None, :],
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
        pre = pre_block(x, xo, w1_base, s1_d, s1_k, b1_base, sb1_d, sb1_k, carry, cols, cmask,
                         hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        back = times_w2t(dy, dyo, w2_base, s2_k, s2_d, b2_base, sb2_k, sb2_d, carry, cols,
                          cmask, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        if BE > 0:
            pre += pre_block(x_b, xo_b, w1_base, s1_d, s1_k, b1_base, sb1_d, sb1_k, carry,
                              cols_b, cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
            back += times_w2t(dy_b, dyo_b, w2_base, s2_k, s2_d, b2_base, sb2_k, sb2_d,
                               carry, cols_b, cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED,
                               BASE_PREC)
        d_pre = back * gelu_grad(pre, GELU_TANH)
        gx += times_w1t(d_pre, w1_base, s1_d, s1_k, b1_base, sb1_d, sb1_k, carry, cols,
                         cmask, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
        if BE > 0:
            gx_b += times_w1t(d_pre, w1_base, s1_d, s1_k, b1_base, sb1_d, sb1_k, carry,
                               cols_b, cmask_b, hid, HID, DTYPE, PREC, DECOMPOSED, BASE_PREC)
    gx_base = gx_ptr + (h * sgx_h + b * sgx_b + first * sgx_n)
    tl.store(gx_base + (rows[:, None] * sgx_n + cols[None, :] * sgx_d), gx, mask=mask)
    if BE > 0:
        tl.store(gx_base + (rows[:, None] * sgx_n + cols_b[None, :] * sgx_d), gx_b,
                 mask=mask_b)


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
    ``cols_step``) and writes gw1[:, j] = x^T (gelu'(P_j) * (dY @ w2[j]^T))
    and gw2[j] = gelu(P_j)^T dY, (H, B, C, D, HID) and (H, B, C, HID, D);
    with DECOMPOSED, the gradients of dW (equal to those of W)."""
    for it in range(ITERS):
        pid = tl.program_id(0) * ITERS + it
        group, hid, hmask = hidden_block(pid, hidden_blocks, HID, BH)
        _cols_backward(x_ptr, dy_ptr, w1_ptr, w2_ptr, gw1_ptr, gw2_ptr, b1_ptr, b2_ptr,
                       carry_ptr, group, hid, hmask, B, C, N, L, D, HID,
                       sx_h, sx_b, sx_n, sx_d, s1_h, s1_b, s1_c, s1_d, s1_k,
                       s2_h, s2_b, s2_c, s2_k, s2_d, sb1_h, sb1_d, sb1_k, sb2_h, sb2_k, sb2_d,
                       sc_h, sc_b, sc_c, BM, BD, BH, DTYPE, PREC, DECOMPOSED, BASE_PREC, TAIL,
                       GELU_TANH, BE)


@triton.jit
def _cols_backward(x_ptr, dy_ptr, w1_ptr, w2_ptr, gw1_ptr, gw2_ptr, b1_ptr, b2_ptr, carry_ptr,
                   group, hid, hmask, B, C, N, L, D, HID,
                   sx_h, sx_b, sx_n, sx_d,
                   s1_h, s1_b, s1_c, s1_d, s1_k,
                   s2_h, s2_b, s2_c, s2_k, s2_d,
                   sb1_h, sb1_d, sb1_k,
                   sb2_h, sb2_k, sb2_d,
                   sc_h, sc_b, sc_c,
                   BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                   DTYPE: tl.constexpr, PREC: tl.constexpr,
                   DECOMPOSED: tl.constexpr, BASE_PREC: tl.constexpr,
                   TAIL: tl.constexpr, GELU_TANH: tl.constexpr, BE: tl.constexpr):
    """``read_backward_cols_kernel``'s work on the hidden units ``hid`` of
    state ``group``: walks its chunk's rows and stores its shares."""
    cols, cmask, cols_b, cmask_b = columns(D, BD, BE)
    c, h, b, c64 = _state_of(group, B, C)
    w1_base = w1_ptr + (h * s1_h + b * s1_b + c64 * s1_c)
    w2_base = w2_ptr + (h * s2_h + b * s2_b + c64 * s2_c)
    w1, w2t = weight_tiles(w1_base, s1_d, s1_k, w2_base, s2_k, s2_d, cols, cmask, hid,
                            hmask)
    carry = 1.0
    b1 = w1
    b2t = w2t
    if DECOMPOSED:  # the whole states in float32, from dW as stored
        carry = tl.load(carry_ptr + (h * sc_h + b * sc_b + c64 * sc_c)).to(tl.float32)
        b1, b2t = weight_tiles(b1_ptr + h * sb1_h, sb1_d, sb1_k, b2_ptr + h * sb2_h, sb2_k,
                                sb2_d, cols, cmask, hid, hmask)
        b1 = whole_state(b1, w1, carry)
        b2t = whole_state(b2t, w2t, carry)
    w1 = w1.to(DTYPE)
    w2t = w2t.to(DTYPE)
    acc1 = tl.zeros((BD, BH), dtype=tl.float32)
    acc2 = tl.zeros((BH, BD), dtype=tl.float32)
    w1_b = w1
    w2t_b = w2t
    b1_b = b1
    b2t_b = b2t
    acc1_b = acc1
    acc2_b = acc2
    if BE > 0:
        w1_b, w2t_b = weight_tiles(w1_base, s1_d, s1_k, w2_base, s2_k, s2_d, cols_b, cmask_b,
                                    hid, hmask)
        b1_b = w1_b
        b2t_b = w2t_b
        if DECOMPOSED:
            b1_b, b2t_b = weight_tiles(b1_ptr + h * sb1_h, sb1_d, sb1_k, b2_ptr + h * sb2_h,
                                        sb2_k, sb2_d, cols_b, cmask_b, hid, hmask)
            b1_b = whole_state(b1_b, w1_b, carry)
            b2t_b = whole_state(b2t_b, w2t_b, carry)
        w1_b = w1_b.to(DTYPE)
        w2t_b = w2t_b.to(DTYPE)
        acc1_b = tl.zeros((BE, BH), dtype=tl.float32)
        acc2_b = tl.zeros((BH, BE), dtype=tl.float32)

    x_base = x_ptr + (h * sx_h + b * sx_b + c64 * L * sx_n)
    dy_base = dy_ptr + group.to(tl.int64) * L * D
    whole = L // BM * BM if TAIL < BM else L
    for r0 in range(0, whole, BM):
        acc1, acc2, acc1_b, acc2_b = cols_rows(
            x_base, dy_base, sx_n, sx_d, r0, c, L, N, D, cols, cmask, cols_b, cmask_b, w1,
            w2t, b1, b2t, w1_b, w2t_b, b1_b, b2t_b, acc1, acc2, acc1_b, acc2_b, BM, BE,
            DTYPE, PREC, DECOMPOSED, BASE_PREC, GELU_TANH)
    if TAIL < BM:  # as grads_cols_kernel's
        for r0 in range(whole, L, TAIL):
            acc1, acc2, acc1_b, acc2_b = cols_rows(
                x_base, dy_base, sx_n, sx_d, r0, c, L, N, D, cols, cmask, cols_b, cmask_b, w1,
                w2t, b1, b2t, w1_b, w2t_b, b1_b, b2t_b, acc1, acc2, acc1_b, acc2_b,
                TAIL, BE, DTYPE, PREC, DECOMPOSED, BASE_PREC, GELU_TANH)

    out = group.to(tl.int64) * D * HID
    store_weight_grads(gw1_ptr, gw2_ptr, out, acc1, acc2, 1.0, D, HID, cols, cmask, hid,
                        hmask)
    if BE > 0:
        store_weight_grads(gw1_ptr, gw2_ptr, out, acc1_b, acc2_b, 1.0, D, HID, cols_b,
                            cmask_b, hid, hmask)


@triton.jit
def read_backward_chunk_kernel(x_ptr, go_ptr, w1_ptr, w2_ptr, g_ptr, gx_ptr, dy_ptr, dg_ptr,
                               gw1_ptr, gw2_ptr, b1_ptr, b2_ptr, carry_ptr,
                               B, C, N, L, R, D, HID, slots,
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
                               TAIL: tl.constexpr, ITERS: tl.constexpr = 1,
                               GELU_TANH: tl.constexpr = False, BE: tl.constexpr = 0):
    """The read's backward in one program per state (h, b, c), as
    ``grads_backward_chunk_kernel`` runs the chunk gradients': the rows
    pass's work over the chunk's R rows (BM at a time, the rest TAIL at a
    time; a share of g's gradient per block, ``dg`` (H * B * C, slots, D)),
    then the columns pass's for each block of BH hidden units, reading back
    the dY this program stored."""
    for it in range(ITERS):
        group = tl.program_id(0) * ITERS + it
        whole = R // BM if TAIL < BM else tl.cdiv(R, BM)  # blocks of BM rows
        for rb in range(0, whole):
            _rows_backward(x_ptr, go_ptr, w1_ptr, w2_ptr, g_ptr, gx_ptr, dy_ptr, dg_ptr, rb, 0,
                           slots, b1_ptr, b2_ptr, carry_ptr, group, 0, B, C, N, L, D, HID,
                           sx_h, sx_b, sx_n, sx_d, s1_h, s1_b, s1_c, s1_d, s1_k,
                           s2_h, s2_b, s2_c, s2_k, s2_d, sg_h, sg_b, sg_c, sg_d,
                           so_h, so_b, so_n, so_d, sgx_h, sgx_b, sgx_n, sgx_d,
                           sb1_h, sb1_d, sb1_k, sb2_h, sb2_k, sb2_d, sc_h, sc_b, sc_c, eps,
                           BM, BD, BH, DTYPE, PREC, DECOMPOSED, BASE_PREC, GELU_TANH, BE)
        if TAIL < BM:  # the rest in blocks of TAIL rows, as row_parts' second launch
            for rb in range(0, tl.cdiv(R - whole * BM, TAIL)):
                _rows_backward(x_ptr, go_ptr, w1_ptr, w2_ptr, g_ptr, gx_ptr, dy_ptr, dg_ptr, rb,
                               whole, slots, b1_ptr, b2_ptr, carry_ptr, group, whole * BM,
                               B, C, N, L, D, HID,
                               sx_h, sx_b, sx_n, sx_d, s1_h, s1_b, s1_c, s1_d, s1_k,
                               s2_h, s2_b, s2_c, s2_k, s2_d, sg_h, sg_b, sg_c, sg_d,
                               so_h, so_b, so_n, so_d, sgx_h, sgx_b, sgx_n, sgx_d,
                               sb1_h, sb1_d, sb1_k, sb2_h, sb2_k, sb2_d, sc_h, sc_b, sc_c, eps,
                               TAIL, BD, BH, DTYPE, PREC, DECOMPOSED, BASE_PREC, GELU_TANH, BE)
        # the chunk's dY, stored by all of this program's threads
        tl.debug_barrier()
        for h0 in range(0, HID, BH):
            hid = h0 + tl.arange(0, BH)
            _cols_backward(x_ptr, dy_ptr, w1_ptr, w2_ptr, gw1_ptr, gw2_ptr, b1_ptr, b2_ptr,
                           carry_ptr, group, hid, hid < HID, B, C, N, L, D, HID,
                           sx_h, sx_b, sx_n, sx_d, s1_h, s1_b, s1_c, s1_d, s1_k,
                           s2_h, s2_b, s2_c, s2_k, s2_d, sb1_h, sb1_d, sb1_k,
                           sb2_h, sb2_k, sb2_d, sc_h, sc_b, sc_c, BM, BD, BH, DTYPE, PREC,
                           DECOMPOSED, BASE_PREC, TAIL, GELU_TANH, BE)
