"""Compressed global branch: G = Conv1x1(C_m->C) . NeuralMemory . Conv1x1(C->C_m)."""
from torch import Tensor, nn

from .neural_memory import NeuralMemory


class GlobalMemoryBranch(nn.Module):
    """Bottleneck the map to C_m channels, run the memory over its flattened
    tokens, and lift the read-out back to C channels (the global map G)."""

    def __init__(self, channels: int, memory_dim: int, **memory_kwargs):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, memory_dim, 1)
        self.memory = NeuralMemory(memory_dim, **memory_kwargs)
        self.proj_out = nn.Conv2d(memory_dim, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj_in(x)
        b, c, h, w = tokens.shape
        tokens = self.memory(tokens.flatten(2).transpose(1, 2))
        return self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))
