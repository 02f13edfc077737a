"""The scan's Triton kernels (imports triton): the states' forward walk over
the updates and its backward. Their launchers are in ``scan.triton``.

Import this module only through ``kernels.availability.load_kernels('scan')``
(``TRITON_INTERPRET=1`` must be set before it is first imported).
"""
import triton
import triton.language as tl

__all__ = ['scan_kernel', 'scan_backward_kernel']


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
        # a gradient may come in its 16-bit state dtype: summed in float32
        s = eta * s - rho * tl.load(g_row + t * sg_u, mask=mask, other=0.0).to(tl.float32)
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
    order by the wrapper); A_0 is W_0's gradient. Gradients, states, their
    cotangents and dG may be 16-bit (bf16 training): each loads as float32,
    and the momenta parked in dG's storage are rounded to its dtype."""
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
        s = eta * s - rho * tl.load(g_row + t * sg_u, mask=mask, other=0.0).to(tl.float32)
        tl.store(d_row + t * sd_u, s.to(d_g_ptr.dtype.element_ty), mask=mask)
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
        adj_w = tl.load(bar_row + t * sb_u, mask=mask, other=0.0).to(tl.float32) + \
            keep_next * adj_w
        adj_s = adj_w + eta_next * adj_s
        grad = tl.load(g_row + (t - 1) * sg_u, mask=mask, other=0.0).to(tl.float32)
        w_prev = tl.load(w_row + (t - 1) * sw_u, mask=mask, other=0.0).to(tl.float32)
        s_prev = tl.zeros((BP,), dtype=tl.float32)  # S_0 = 0
        if t > 1:  # S_{t-1}, at d_row[t - 2]: overwritten by dG_{t-1} only at step t - 1
            s_prev = tl.load(d_row + (t - 2) * sd_u, mask=mask, other=0.0).to(tl.float32)
        tl.store(d_row + (t - 1) * sd_u, (-rho * adj_s).to(d_g_ptr.dtype.element_ty), mask=mask)
        tl.store(d_lr_ptr + shares + t - 1, -tl.sum(adj_s * grad, axis=0))
        tl.store(d_keep_ptr + shares + t - 1, keep * tl.sum(adj_w * w_prev, axis=0))
        tl.store(d_momentum_ptr + shares + t - 1, eta * tl.sum(adj_s * s_prev, axis=0))
        keep_next = keep
        eta_next = eta
    if HAS_INITIAL:
        adj_w = tl.load(bar_row, mask=mask, other=0.0).to(tl.float32) + keep_next * adj_w
        tl.store(d_w0_ptr + n * s0_n + p * s0_p, adj_w, mask=mask)
