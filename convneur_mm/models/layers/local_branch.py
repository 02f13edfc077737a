"""Locality-preserving branch: the ConvNeXt-V2 block body (Sec. 3.2)."""
import torch
from torch import Tensor, nn

from convneur_mm.models.utils.precision import at_least_float32, autocast_dtype


def spatial_l2_norm(x: Tensor) -> Tensor:
    """The L2 norm over H and W of a (B, H, W, C) map, (B, 1, 1, C).

    What ``torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)`` computes,
    faster on CPU: ATen's norm kernel does not vectorize a reduction over
    outer dims, ``sum`` does (docs/notes/investigations.md#grns-norm-on-a-cpu).

    * Accumulated in float32 (float64 stays float64). float16 is squared in
      float32 (its squares overflow from |x| = 256); bfloat16, which has
      float32's range, is squared in bfloat16, so that autograd saves the
      bfloat16 map and not a float32 copy of it (``--amp`` training). The
      square is ``x * x``: CUDA's autocast runs ``pow`` in float32 (and would
      save that copy); ``mul`` it leaves alone.
    * A channel that is zero everywhere has a zero gradient, as with
      ``vector_norm`` (the sum is clamped to the smallest normal number
      before the square root, whose derivative at 0 is infinite).
    * The result is in the accumulation dtype under autocast, as
      ``vector_norm`` is on CUDA (on CPU, where it has no autocast rule, it
      was bfloat16; GRN's output is float32 either way), else in ``x``'s.
    """
    acc = at_least_float32(x.dtype)
    base = x if x.dtype == torch.bfloat16 else x.to(acc)
    squares = base * base
    total = squares.sum(dim=(1, 2), keepdim=True, dtype=acc)
    norm = total.clamp_min(torch.finfo(acc).tiny).sqrt()
    return norm if autocast_dtype(x.device.type) is not None else norm.to(x.dtype)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt-V2) on channels-last input."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        gx = spatial_l2_norm(x)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return self.gamma * (x * nx) + self.beta + x


class LocalBranch(nn.Module):
    """7x7 depthwise conv -> LN -> Linear(C, 4C) -> GELU -> GRN -> Linear(4C, C).

    Returns F_loc in (B, C, H, W) layout; the residual lives in the block.
    """

    def __init__(self, channels: int, kernel_size: int = 7, mlp_ratio: int = 4):
        super().__init__()
        hidden = mlp_ratio * channels
        self.dwconv = nn.Conv2d(channels, channels, kernel_size,
                                padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x)))))
        return x.permute(0, 3, 1, 2)
