"""Vision-RWKV's bidirectional WKV in pure PyTorch, linear in tokens, any length.

For a sequence of N tokens and per-channel parameters ``decay`` and ``first``
(w = decay / N, u = first / N, as Vision-RWKV passes them to its kernel)::

    wkv_t = (sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t)
            / (sum_{i != t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t})

The reference is a CUDA kernel limited to 1024 tokens (Tmax). Because the
decay is one constant per channel, each direction's sum factors into a
position term times a prefix sum:

    e^{-(t-1-i) w} = e^{p_i w} e^{-(p_t - 1) w},    p = position - (N-1)/2,

so both directions are one (reverse) cumulative sum each: O(N C) work and
memory, parallel on any device, no length limit. Exponents are kept in range
by subtracting each channel's max key (it cancels in the ratio) and by
centering the positions: with w = decay / N every position factor lies
within e^{+-|decay|/2}, whatever N is. The result is exact to float32
rounding while |decay| stays below ~30 (the weights a channel gives two
tokens then differ by less than e^{60}; the reference initializes decay at 0
and trained models keep it within a few units), and it runs in float32 even
under autocast. Checked against a float64 step-by-step recurrence in
tests/test_models/test_layers/test_wkv.py, to 8192 tokens.
"""
import torch
from torch import Tensor

from convneur_mm.models.utils.precision import at_least_float32, autocast_off


def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """sum_{i < t} x_i along ``dim`` (a shift, never a subtraction)."""
    total = x.cumsum(dim)
    return torch.cat([torch.zeros_like(total.narrow(dim, 0, 1)),
                      total.narrow(dim, 0, x.shape[dim] - 1)], dim)


def bi_wkv(decay: Tensor, first: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bidirectional WKV of (B, N, C) keys and values; ``decay`` and ``first`` are (C,).

    Returns (B, N, C) in the dtype of ``v``; computed in float32 (float64
    for float64 input) with autocast off.
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f'k and v must both be (B, N, C), got {tuple(k.shape)} and '
                         f'{tuple(v.shape)}')
    n, out_dtype = k.shape[1], v.dtype
    dtype = at_least_float32(v.dtype)
    with autocast_off(k.device.type):
        k, v = k.to(dtype), v.to(dtype)
        w, u = decay.to(dtype) / n, first.to(dtype) / n
        k = k - k.amax(dim=1, keepdim=True).detach()  # <= 0; cancels in the ratio
        pos = (torch.arange(n, device=k.device, dtype=dtype) - (n - 1) / 2)[:, None]
        weight = k.exp()
        # (B, N, C, 2): numerator and denominator terms, summed alike
        terms = torch.stack([weight * v, weight], dim=-1)
        fwd = _exclusive_cumsum(terms * (pos * w).exp()[..., None], dim=1)
        bwd = _exclusive_cumsum((terms * (-pos * w).exp()[..., None]).flip(1), dim=1).flip(1)
        total = (fwd * (-(pos - 1) * w).exp()[..., None]
                 + bwd * ((pos + 1) * w).exp()[..., None]
                 + terms * u.exp()[..., None])
        out = total[..., 0] / total[..., 1]
    return out.to(out_dtype)
