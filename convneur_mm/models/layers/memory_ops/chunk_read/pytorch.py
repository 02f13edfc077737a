"""The chunk read in PyTorch ops (differentiable): chunk t reads state t."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from convneur_mm.models.utils.shapes import known_zero
from ..common import MemoryWeights
from ..read.closed_form import read_closed_form
from ..read.pytorch import read_torch


def chunk_read_torch(states: MemoryWeights, queries: Tensor, chunk_size: int,
                     operand_dtype: Optional[torch.dtype] = None,
                     base: Optional[MemoryWeights] = None,
                     carry: Optional[Tensor] = None, *, backward: str = 'autograd',
                     gelu_approximate: str = 'none') -> Tensor:
    """Token n of head h and image b reads state ``n // chunk_size`` of (h, b);
    the heads merged in the output.

    The queries are zero-padded to whole chunks (with a symbolic N always,
    maybe by zero: no guard on whether N is a multiple of L, so one graph
    serves both) and the padding is cut last, from the merged tensor: cutting
    it first would make the merge a copy or a view depending on whether the
    padding is empty, which symbolic shapes would have to guard on.

    Args:
        states: per-chunk fast weights ``w1`` (H, B, C, d, 4d),
            ``w2`` (H, B, C, 4d, d), ``g`` (H, B, C, d); with ``base``: dW_t
            for ``w1`` and ``w2`` (the decomposed read, ``read_torch``).
        queries: (H, B, N, d); N <= C * chunk_size.
        chunk_size: tokens per chunk L.
        operand_dtype: the products' operand dtype (``product``).
        base: W_0 per head, ``w1`` (H, d, 4d), ``w2`` (H, 4d, d).
        carry: (H, B, C) a_t of each state, with ``base``.
        backward: 'autograd' (``read_torch``) or 'closed_form'
            (``read_closed_form``: the same read, a hand-derived backward).
        gelu_approximate: the MLP's GELU, ``F.gelu``'s ``approximate``.

    Returns:
        (B, N, H * d) read-outs.
    """
    h, b, n, hd = queries.shape
    num_chunks = states.w1.shape[2]
    padded = num_chunks * chunk_size
    if not known_zero(padded - n):
        queries = F.pad(queries, (0, 0, 0, padded - n))
    groups = h * b * num_chunks
    read = read_closed_form if backward == 'closed_form' else read_torch
    out = read(states.map(lambda t: t.reshape(groups, *t.shape[3:])),
               queries.reshape(groups, chunk_size, hd), operand_dtype, base,
               None if carry is None else carry.reshape(groups),
               gelu_approximate=gelu_approximate)
    return out.reshape(h, b, padded, hd).permute(1, 2, 0, 3).reshape(b, padded, h * hd)[:, :n]
