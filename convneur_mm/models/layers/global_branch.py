"""Compressed global branch: G = Conv1x1(C_m->C) . mixer . Conv1x1(C->C_m).

The token mixer is ConvNeur's chunked neural memory; global self-attention in
the same bottleneck scaffold is the comparison of the paper's Table 5 and of
our resolution-scaling benchmark.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from .neural_memory import NeuralMemory

MIXERS = ('memory', 'attention')


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all tokens of an image (quadratic in N)."""

    def __init__(self, dim: int, heads: int = 1):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f'attention dim {dim} is not divisible by heads={heads}')
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class GlobalBranch(nn.Module):
    """Bottleneck the map to C_m channels, mix its flattened tokens globally,
    and lift the result back to C channels (the global map G).

    Args:
        channels: C.
        memory_dim: C_m.
        mixer: 'memory' (ConvNeur) or 'attention'.
        **mixer_kwargs: NeuralMemory settings (chunk_size, max_lr, update,
            heads, scan_block); attention uses ``heads`` only.
    """

    def __init__(self, channels: int, memory_dim: int, mixer: str = 'memory',
                 **mixer_kwargs):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f'global mixer must be one of {MIXERS}, got {mixer!r}')
        self.proj_in = nn.Conv2d(channels, memory_dim, 1)
        if mixer == 'memory':
            self.memory = NeuralMemory(memory_dim, **mixer_kwargs)
        else:
            self.attention = GlobalSelfAttention(memory_dim, mixer_kwargs.get('heads', 1))
        self.mixer = mixer
        self.proj_out = nn.Conv2d(memory_dim, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj_in(x)
        b, c, h, w = tokens.shape
        tokens = getattr(self, self.mixer)(tokens.flatten(2).transpose(1, 2))
        return self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))
