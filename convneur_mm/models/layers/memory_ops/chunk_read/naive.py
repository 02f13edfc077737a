"""The chunk read written plainly, chunk by chunk: the reference."""
from typing import Optional

import torch
from torch import Tensor

from ..common import MemoryWeights
from ..read.naive import read_naive


def chunk_read_naive(states: MemoryWeights, queries: Tensor, chunk_size: int,
                     base: Optional[MemoryWeights] = None,
                     carry: Optional[Tensor] = None, *,
                     gelu_approximate: str = 'none') -> Tensor:
    """``chunk_read_torch``'s result by a loop over the chunks, exact products.

    Args:
        states: ``w1`` (H, B, C, d, 4d), ``w2`` (H, B, C, 4d, d), ``g`` (H, B, C, d).
        queries: (H, B, N, d).
        chunk_size: tokens per chunk L.
        base: W_0 per head (``read_naive``), with ``carry`` (H, B, C).
        carry: (H, B, C) a_t of each state.
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.

    Returns:
        (B, N, H * d).
    """
    h, b, n, d = queries.shape
    outs = []
    for c, start in enumerate(range(0, n, chunk_size)):
        state = states.map(lambda t: t[:, :, c].reshape(h * b, *t.shape[3:]))
        outs.append(read_naive(state, queries[:, :, start:start + chunk_size].reshape(
            h * b, -1, d), base, None if carry is None else carry[:, :, c].reshape(-1),
            gelu_approximate=gelu_approximate))
    return torch.cat(outs, dim=1).view(h, b, n, d).permute(1, 2, 0, 3).reshape(b, n, h * d)
