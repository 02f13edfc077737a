"""Global multi-head self-attention over the tokens of an image (Table 5, row 5).

Quadratic in the number of tokens N: its activation memory and attention
maps are what the paper's resolution argument is about.
"""
from contextlib import nullcontext
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from convneur_mm.utils.compiler_marks import assume_constant_result


@assume_constant_result
def _deterministic_warn_only() -> bool:
    """``use_deterministic_algorithms(True, warn_only=True)`` is in force.

    A constant to the compiler: Dynamo cannot trace
    ``is_deterministic_algorithms_warn_only_enabled`` (a graph break at every
    attention call under ``--compile --deterministic`` on CUDA), and its
    global-state guard already recompiles when either flag changes."""
    return (torch.are_deterministic_algorithms_enabled()
            and torch.is_deterministic_algorithms_warn_only_enabled())


def deterministic_kernel(device_type: str) -> ContextManager:
    """The attention kernels to allow: the plain-math one only on CUDA when a
    backward may follow under ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` (``tools/train.py --deterministic``). CUDA's flash,
    memory-efficient and cuDNN backward kernels choose their deterministic
    variant only when that mode raises; under ``warn_only`` they warn and run
    the non-deterministic one. Their forward passes are deterministic. The
    math kernel is deterministic and materializes the N x N map (memory
    quadratic in N)."""
    if device_type == 'cuda' and torch.is_grad_enabled() and _deterministic_warn_only():
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """``F.scaled_dot_product_attention``, deterministic where asked."""
    with deterministic_kernel(q.device.type):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all N tokens of one image, (B, N, d) -> (B, N, d).

    The products run in ``F.scaled_dot_product_attention``: a fused kernel
    (flash on a CPU and, for fp16/bf16 inputs, on CUDA; the memory-efficient
    one for float32 on CUDA), so no N x N map is materialized in memory
    (except in deterministic mode on CUDA, see ``deterministic_kernel``).
    """

    def __init__(self, dim: int, heads: int = 1):
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f'attention heads must be an int >= 1, got {heads!r}')
        if dim % heads != 0:
            raise ValueError(f'attention dim {dim} is not divisible by heads={heads}')
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
