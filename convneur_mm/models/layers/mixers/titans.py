"""Titans memory-as-context (Behrouz et al.; the paper's ref. [2]; Table 5, row 7).

The MAC layer of the public titans-pytorch: the neural memory's read-out is
added to the tokens, then attention runs within segments of the memory's
chunk length, each segment also attending to a few learned persistent
key/value tokens. The memory is ConvNeur's own ``NeuralMemory`` (one
implementation), used through its public (B, N, d) -> (B, N, d) interface:
the layer composes it with the attention and needs nothing else from it.
The paper's design is this layer with the segmented attention removed.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..neural_memory import NeuralMemory
from .attention import attention


class SegmentedAttention(nn.Module):
    """Multi-head attention within consecutive segments of ``segment_len``
    tokens, plus ``persistent_tokens`` learned key/value pairs per head that
    every segment attends to; (B, N, d) -> (B, N, d).

    As in titans-pytorch: pre-RMSNorm, bias-free qkv and output projections
    of ``heads * head_dim`` inner width, persistent key/values initialized at
    zero. Unlike it, attention within a segment is bidirectional and has no
    rotary position code: an image has no causal order, and the branch's
    other attention mixer has no position code either (the convolutions
    before it carry position). A last partial segment attends only to its
    own tokens (and the persistent ones), never to padding.
    """

    def __init__(self, dim: int, segment_len: int, heads: int = 8, head_dim: int = 64,
                 persistent_tokens: int = 4):
        super().__init__()
        if segment_len < 1 or heads < 1 or head_dim < 1 or persistent_tokens < 0:
            raise ValueError(
                f'segmented attention needs segment_len, heads, head_dim >= 1 and '
                f'persistent_tokens >= 0; got {segment_len}, {heads}, {head_dim}, '
                f'{persistent_tokens}')
        self.segment_len, self.heads, self.head_dim = segment_len, heads, head_dim
        inner = heads * head_dim
        self.norm = nn.RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.persistent_kv = nn.Parameter(torch.zeros(2, heads, persistent_tokens, head_dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.persistent_kv)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        # a map shorter than one segment is one segment of its own length:
        # padding it to segment_len (4096 for dense tasks) would make every
        # small stage pay a 4096^2 attention
        seg = min(self.segment_len, n)
        segments = -(-n // seg)
        pad = segments * seg - n
        qkv = self.to_qkv(self.norm(x))
        if pad:
            qkv = F.pad(qkv, (0, 0, 0, pad))
        # (3, B * segments, heads, seg, head_dim): 4-D, so that SDPA takes a
        # fused kernel (on CUDA the memory-efficient one: flash takes no mask)
        q, k, v = qkv.view(b * segments, seg, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        persistent = self.persistent_kv.to(k.dtype)[:, None].expand(
            2, b * segments, *self.persistent_kv.shape[1:])
        k = torch.cat([persistent[0], k], dim=-2)
        v = torch.cat([persistent[1], v], dim=-2)
        mask = None
        if pad:  # padding keys of each image's last segment are never attended to
            valid = torch.ones(segments, k.shape[-2], dtype=torch.bool, device=x.device)
            valid[-1, k.shape[-2] - pad:] = False
            mask = valid.repeat(b, 1)[:, None, None, :]
        out = attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, segments * seg, -1)[:, :n]
        return self.to_out(out)


class TitansMAC(nn.Module):
    """``h = x + memory(x)``, then ``h + attention(h)``; (B, N, d) -> (B, N, d).

    Args:
        dim: token width d (the branch width C_m).
        memory_cfg: NeuralMemory settings (chunk_size, max_lr, update,
            heads, scan_block), the backbone's ``memory_cfg``.
        heads, head_dim: of the segmented attention (titans-pytorch: 8 x 64).
        persistent_tokens: learned key/value pairs per head (4).
        segment_len: attention segment; default the memory's chunk size.
    """

    def __init__(self, dim: int, memory_cfg: dict, heads: int = 8, head_dim: int = 64,
                 persistent_tokens: int = 4, segment_len: int = None):
        super().__init__()
        self.memory = NeuralMemory(dim, **memory_cfg)
        self.attention = SegmentedAttention(
            dim, self.memory.chunk_size if segment_len is None else segment_len, heads,
            head_dim, persistent_tokens)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.memory(x)
        return x + self.attention(x)
