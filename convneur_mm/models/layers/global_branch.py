"""Compressed global branch: G = Conv1x1(C_m->C) . mixer . Conv1x1(C->C_m).

The mixer is ConvNeur's chunked neural memory; every other global-branch type
of the paper's Table 5 (self-attention, CBAM, Non-local, IR-RWKV, Titans)
runs in the same bottleneck scaffold at the same width C_m (``mixers``).
"""
from typing import Optional

from torch import Tensor, nn

from .mixers import MIXERS, GlobalSelfAttention, build_mixer, resolve_mixer_cfg
from convneur_mm.models.utils.precision import Float32Conv2d, at_least_float32, autocast_dtype, in_float32

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
        # gradients the memory's RMSNorms scale by 1/rms, was the network's
        # largest in float16 (4e3 at loss scale 1 on the COCO detector). A
        # model cast to 16 bits (no autocast) keeps its dtype between layers.
        out_dtype = at_least_float32(x.dtype) if autocast_dtype(x.device.type) else x.dtype
        mixed = in_float32(self.proj_in, x, out_dtype)
        spec = MIXERS[self.mixer]
        mixer = getattr(self, spec.attribute)
        if spec.tokens:
            b, c, h, w = mixed.shape
            mixed = mixer(mixed.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        else:
            mixed = mixer(mixed)
        return self.proj_out(mixed)
