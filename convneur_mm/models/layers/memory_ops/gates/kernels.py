"""The gates' Triton kernel (imports triton): each written chunk's decay,
momentum and step-size modulation from its summary. Its launcher is in
``gates.triton``.

Import this module only through ``kernels.availability.load_kernels('gates')``
(``TRITON_INTERPRET=1`` must be set before it is first imported).
"""
import triton
import triton.language as tl

__all__ = ['gates_kernel']


@triton.jit
def _log1p(y):
    """log(1 + y) for y in [0, 1], accurate where 1 + y rounds to 1 (Kahan's
    form: libdevice's log1p has no interpreter counterpart)."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _log_sigmoid(z):
    """log(sigmoid(z)) without overflow: min(z, 0) - log(1 + exp(-|z|))."""
    return tl.minimum(z, 0.0) - _log1p(tl.exp(-tl.abs(z)))


@triton.jit
def _times_wt(s, w_ptr, s_o, s_d, outs, omask, cols, cmask):
    """s (BR, BK) times the (BK, BO) tile of w^T at rows ``outs``, columns ``cols``."""
    w = tl.load(w_ptr + outs[None, :] * s_o + cols[:, None] * s_d,
                mask=cmask[:, None] & omask[None, :], other=0.0)
    return tl.dot(s, w, input_precision='ieee')


@triton.jit
def gates_kernel(s_ptr, wd_ptr, bd_ptr, wm_ptr, bm_ptr, wl_ptr, bl_ptr,
                 keep_ptr, momentum_ptr, lr_ptr, R, U, D, H, K,
                 ss_b, ss_u, ss_d, sd_o, sd_d, sm_o, sm_d, sl_o, sl_d, sbd, sbm, sbl,
                 BR: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BL: tl.constexpr):
    """BR rows (image, chunk) of the summary (B, U, D): the three layers'
    logits in float32 (IEEE products), then log(1 - sigmoid), log(sigmoid)
    and sigmoid written heads leading: log_keep and log_momentum (H, B U),
    lr_mod (K, H, B U), each contiguous (``gates_torch``'s layouts)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    row_at = (rows // U).to(tl.int64) * ss_b + (rows % U).to(tl.int64) * ss_u
    heads = tl.arange(0, BH)
    hmask = heads < H
    outs = tl.arange(0, BL)
    lmask = outs < K * H
    decay = tl.zeros((BR, BH), dtype=tl.float32)
    momentum = tl.zeros((BR, BH), dtype=tl.float32)
    lr = tl.zeros((BR, BL), dtype=tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < D
        s = tl.load(s_ptr + row_at[:, None] + cols[None, :] * ss_d,
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        decay += _times_wt(s, wd_ptr, sd_o, sd_d, heads, hmask, cols, cmask)
        momentum += _times_wt(s, wm_ptr, sm_o, sm_d, heads, hmask, cols, cmask)
        lr += _times_wt(s, wl_ptr, sl_o, sl_d, outs, lmask, cols, cmask)
    decay += tl.load(bd_ptr + heads * sbd, mask=hmask, other=0.0)[None, :]
    momentum += tl.load(bm_ptr + heads * sbm, mask=hmask, other=0.0)[None, :]
    lr += tl.load(bl_ptr + outs * sbl, mask=lmask, other=0.0)[None, :]
    # int64 offsets: H B U and K H B U entries may pass 2**31 where B U does not
    rows = rows.to(tl.int64)
    at = heads.to(tl.int64)[None, :] * R + rows[:, None]
    mask = rmask[:, None] & hmask[None, :]
    tl.store(keep_ptr + at, _log_sigmoid(-decay), mask=mask)
    tl.store(momentum_ptr + at, _log_sigmoid(momentum), mask=mask)
    # column h K + k of the modulation's logits is tensor k's rho of head h
    slot = ((outs % K) * H + outs // K).to(tl.int64)
    tl.store(lr_ptr + slot[None, :] * R + rows[:, None], tl.sigmoid(lr),
             mask=rmask[:, None] & lmask[None, :])
