"""CBAM (Woo et al., ECCV 2018) on the C_m map (Table 5, row 3).

A channel gate from globally pooled statistics, then a spatial gate from a
7x7 conv over per-pixel channel statistics. It reweights the map but moves no
information between positions beyond those pooled channel statistics, which
is why the paper finds it barely above local-only.
"""
import torch
from torch import Tensor, nn

from convneur_mm.models.utils.precision import at_least_float32


class CBAM(nn.Module):
    """``x * Mc(x)``, then ``* Ms(.)``; (B, C, H, W) -> (B, C, H, W).

    Mc = sigmoid(MLP(avgpool) + MLP(maxpool)), one MLP C -> C/r -> C (ReLU);
    Ms = sigmoid(conv7x7([max_c, mean_c])). The spatial conv has a bias where
    the reference has BatchNorm(1): ConvNeur keeps no batch statistics
    (batch-independent outputs, nothing to synchronize across processes).
    The statistics are taken in float32 (a mean over H*W values in bf16
    would lose the small differences that the gates act on).

    Args:
        dim: channels C (the branch width C_m).
        reduction: r, the MLP bottleneck ratio (16 in the paper); at least
            one hidden channel remains for maps narrower than r.
        kernel_size: of the spatial gate's conv (7 in the paper).
    """

    def __init__(self, dim: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        if reduction < 1:
            raise ValueError(f'CBAM reduction must be >= 1, got {reduction}')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'CBAM kernel_size must be odd and positive, got {kernel_size}')
        hidden = max(dim // reduction, 1)  # at least one channel for narrow maps
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, dim, 1))
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        stats = x.to(at_least_float32(x.dtype))
        pooled = torch.cat([stats.mean((2, 3), keepdim=True),
                            stats.amax((2, 3), keepdim=True)]).to(x.dtype)
        avg_logit, max_logit = self.channel_mlp(pooled).chunk(2)
        x = x * torch.sigmoid(avg_logit + max_logit)
        stats = x.to(stats.dtype)
        maps = torch.cat([stats.amax(1, keepdim=True), stats.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial_conv(maps.to(x.dtype)))

