"""IR-RWKV (RWKV-UNet, Jiang et al. 2025; the paper's ref. [39]; Table 5, row 6).

An inverted-residual block around a Vision-RWKV spatial mix: the mix is
linear in tokens but scans the flattened map in one (bidirectional) order,
which is the paper's explanation for its weak row.
"""
import torch
from torch import Tensor, nn

from ..norms import LayerNorm2d
from .wkv import bi_wkv


def token_shift(x: Tensor, gamma: float = 0.25) -> Tensor:
    """Vision-RWKV's Q-shift: four channel groups of ``gamma * C`` channels
    take their value from the pixel to the left, right, top and bottom
    (zeros at the border); the remaining channels stay. (B, C, H, W)."""
    group = int(x.shape[1] * gamma)
    out = torch.zeros_like(x)
    g0, g1, g2, g3 = (slice(i * group, (i + 1) * group) for i in range(4))
    out[:, g0, :, 1:] = x[:, g0, :, :-1]  # from the left
    out[:, g1, :, :-1] = x[:, g1, :, 1:]  # from the right
    out[:, g2, 1:] = x[:, g2, :-1]  # from above
    out[:, g3, :-1] = x[:, g3, 1:]  # from below
    out[:, 4 * group:] = x[:, 4 * group:]
    return out


class SpatialMix(nn.Module):
    """Vision-RWKV spatial mix on a (B, C, H, W) map, returning (B, N, C) tokens.

    Token shift, then k, v, r from interpolations of each token with its
    shifted version; the bidirectional WKV of (k, v) over the row-major
    flattened map, a LayerNorm (the reference's ``key_norm``), the
    receptance gate sigmoid(r) and the output projection.
    """

    def __init__(self, dim: int, shift_gamma: float = 0.25):
        super().__init__()
        if not 0 <= shift_gamma <= 0.25:
            raise ValueError(f'shift_gamma must be in [0, 0.25], got {shift_gamma}')
        self.shift_gamma = shift_gamma
        self.spatial_decay = nn.Parameter(torch.empty(dim))
        self.spatial_first = nn.Parameter(torch.empty(dim))
        self.mix_k = nn.Parameter(torch.empty(dim))
        self.mix_v = nn.Parameter(torch.empty(dim))
        self.mix_r = nn.Parameter(torch.empty(dim))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """RWKV-UNet's init of the mix parameters (uniform attention, half shift)."""
        nn.init.zeros_(self.spatial_decay)
        nn.init.zeros_(self.spatial_first)
        for mix in (self.mix_k, self.mix_v, self.mix_r):
            nn.init.constant_(mix, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        shifted = token_shift(x, self.shift_gamma).flatten(2).transpose(1, 2)

        def interpolate(mix: Tensor) -> Tensor:
            return tokens * mix + shifted * (1 - mix)

        k = self.key(interpolate(self.mix_k))
        v = self.value(interpolate(self.mix_v))
        r = self.receptance(interpolate(self.mix_r))
        wkv = self.key_norm(bi_wkv(self.spatial_decay, self.spatial_first, k, v))
        return self.output(torch.sigmoid(r) * wkv)


class IRRWKV(nn.Module):
    """RWKV-UNet's inverted-residual RWKV block; (B, C, H, W) -> same.

    ``x + proj(h)`` with ``h = act(norm(expand(norm(x))))``, then
    ``h = h + LN(SpatialMix(h))`` and ``h = h + SiLU(norm(dwconv(h)))``.
    LayerNorms over channels stand where RWKV-UNet has BatchNorm in its
    convolutions: ConvNeur keeps no batch statistics.

    Args:
        dim: channels C (the branch width C_m).
        expansion: hidden width / C (1 keeps the paper's global dimension C_m).
        kernel_size: of the depthwise conv (RWKV-UNet uses 5).
        shift_gamma: share of channels per token-shift direction.
    """

    def __init__(self, dim: int, expansion: float = 1.0, kernel_size: int = 5,
                 shift_gamma: float = 0.25):
        super().__init__()
        hidden = int(dim * expansion)
        if hidden < 1:
            raise ValueError(f'IR-RWKV expansion {expansion} leaves no channels of {dim}')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'IR-RWKV kernel_size must be odd and positive, got {kernel_size}')
        self.norm = LayerNorm2d(dim)
        self.expand = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=False),
                                    LayerNorm2d(hidden), nn.ReLU(inplace=True))
        self.mix = SpatialMix(hidden, shift_gamma)
        self.mix_norm = nn.LayerNorm(hidden)
        self.local = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden,
                      bias=False), LayerNorm2d(hidden), nn.SiLU(inplace=True))
        self.proj = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.expand(self.norm(x))
        b, c, height, width = h.shape
        mixed = self.mix_norm(self.mix(h)).transpose(1, 2).reshape(b, c, height, width)
        h = h + mixed
        h = h + self.local(h)
        return x + self.proj(h)
