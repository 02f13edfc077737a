"""Compressed global branch: G = Conv1x1(C_m->C) . mixer . Conv1x1(C->C_m).

The mixer is ConvNeur's chunked neural memory; every other global-branch type
of the paper's Table 5 (self-attention, CBAM, Non-local, IR-RWKV, Titans)
runs in the same bottleneck scaffold at the same width C_m (``mixers``).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .mixers import MIXERS, GlobalSelfAttention, build_mixer, resolve_mixer_cfg
from .neural_memory import plain_layers
from convneur_mm.models.utils.precision import (Float32Conv2d, at_least_float32, autocast_dtype,
                                                float32_operands, in_float32)

__all__ = ['GlobalBranch', 'GlobalSelfAttention', 'MIXERS']


class GlobalBranch(nn.Module):
    """Bottleneck the map to C_m channels, mix it globally, and lift the result
    back to C channels (the global map G).

    Args:
        channels: C.
        memory_dim: C_m.
        mixer: a key of ``MIXERS``: 'memory' (ConvNeur), 'attention',
            'cbam', 'nonlocal', 'rwkv' or 'titans'.
        mixer_cfg: the mixer's own settings (``MIXERS[mixer].settings``).
        **memory_cfg: NeuralMemory settings (chunk_size, max_lr, update,
            heads, scan_block), for the mixers that hold a memory.
    """

    def __init__(self, channels: int, memory_dim: int, mixer: str = 'memory',
                 mixer_cfg: Optional[dict] = None, **memory_cfg):
        super().__init__()
        mixer_cfg = resolve_mixer_cfg(mixer, mixer_cfg)  # a clear error first
        self.proj_in = Float32Conv2d(channels, memory_dim, 1)
        # under the mixer's own name: 'memory', 'attention', ... (state-dict keys)
        self.add_module(MIXERS[mixer].attribute,
                        build_mixer(mixer, memory_dim, memory_cfg, mixer_cfg))
        self.mixer = mixer
        self.proj_out = nn.Conv2d(memory_dim, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        # float32 under autocast: the memory computes in float32 anyway, and
        # this projection's bias gradient, a sum over every token of
        # gradients the memory's RMSNorms scale by 1/rms, is the network's
        # largest in float16 (4e3 at loss scale 1 on the COCO detector). A
        # model cast to 16 bits (no autocast) keeps its dtype between layers.
        out_dtype = at_least_float32(x.dtype) if autocast_dtype(x.device.type) else x.dtype
        spec = MIXERS[self.mixer]
        mixer = getattr(self, spec.attribute)
        if spec.tokens and plain_layers((self.proj_in, Float32Conv2d),
                                        (self.proj_out, nn.Conv2d)):
            return self._forward_channels_last(x, mixer, out_dtype)
        mixed = in_float32(self.proj_in, x, out_dtype)
        if spec.tokens:
            b, c, h, w = mixed.shape
            mixed = mixer(mixed.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        else:
            mixed = mixer(mixed)
        return self.proj_out(mixed)

    def _forward_channels_last(self, x: Tensor, mixer: nn.Module,
                               out_dtype: torch.dtype) -> Tensor:
        """The token mixers' path without layout copies: the 1x1 projections
        are batched products on the (B, N, C) token view of ``x`` (a
        transposed operand, which GEMMs read in place), and G is returned as
        the (B, C, H, W) view of the (B, N, C) result: channels-last strides,
        as the local branch's F_loc has. Same maths as the convolutions."""
        b, c, h, w = x.shape

        def project_in(t: Tensor) -> Tensor:
            weight, bias = float32_operands(t, self.proj_in.weight, self.proj_in.bias)[1:]
            return _linear(t, weight.flatten(1), bias)

        mixed = mixer(in_float32(project_in, x.flatten(2).transpose(1, 2), out_dtype))
        out = _linear(mixed, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return out.transpose(1, 2).view(b, c, h, w)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` for (B, N, K) ``x`` of any strides, one
    batched product (``F.linear`` would copy a transposed ``x`` first)."""
    weight = weight.t().expand(x.shape[0], *weight.t().shape)
    if bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(bias, x, weight)
