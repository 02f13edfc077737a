"""Non-local block (Wang et al., CVPR 2018), embedded Gaussian (Table 5, row 4).

Dense and quadratic on purpose: every position attends to every other one
through an explicit (H*W) x (H*W) affinity matrix, as in mmcv's NonLocal2d,
the implementation OpenMMLab models use. That matrix is the row's cost.
"""
import math

import torch
from torch import Tensor, nn

from convneur_mm.models.utils.precision import at_least_float32


class NonLocal2d(nn.Module):
    """``x + W_z(softmax(theta(x)^T phi(x) / sqrt(d')) g(x))``; (B, C, H, W) -> same.

    theta, phi and g are 1x1 convs C -> C / reduction; W_z (``conv_out``)
    maps back and starts at zero, so the block starts as the identity (the
    reference's ``zeros_init``). The affinities are products of
    ``torch.matmul`` as in the reference, with theta scaled before the
    product rather than the product after it (the same value; under fp16
    autocast the unscaled product overflows sooner); the softmax over all
    H*W positions runs in float32.

    Args:
        dim: channels C (the branch width C_m).
        reduction: C / d', the inner width's reduction (2 in the paper).
        use_scale: divide the affinities by sqrt(d') (the reference's default).
    """

    def __init__(self, dim: int, reduction: int = 2, use_scale: bool = True):
        super().__init__()
        if reduction < 1:
            raise ValueError(f'non-local reduction must be >= 1, got {reduction}')
        inner = max(dim // reduction, 1)
        self.scale = 1.0 / math.sqrt(inner) if use_scale else 1.0
        self.theta = nn.Conv2d(dim, inner, 1)
        self.phi = nn.Conv2d(dim, inner, 1)
        self.g = nn.Conv2d(dim, inner, 1)
        self.conv_out = nn.Conv2d(inner, dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init; the backbone calls it after its generic init."""
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, HW, d')
        phi = self.phi(x).flatten(2)  # (B, d', HW)
        g = self.g(x).flatten(2).transpose(1, 2)  # (B, HW, d')
        affinity = torch.matmul(theta * self.scale, phi)
        weights = affinity.to(at_least_float32(affinity.dtype)).softmax(
            dim=-1).to(g.dtype)
        y = torch.matmul(weights, g).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.conv_out(y)
