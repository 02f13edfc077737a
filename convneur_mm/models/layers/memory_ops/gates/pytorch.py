"""The gates in PyTorch: the three layers as one product, differentiable."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .weights import ChunkGates, GateWeights, check_gate_arguments, gate_sizes


def chunk_gates_torch(summary: Tensor, weights: GateWeights) -> ChunkGates:
    """The gates of each written chunk from its summary: the decay's,
    momentum's and step-size modulation's logits as one product, then
    ``gates_from_logits``.

    Args:
        summary: (B, U, d) each written chunk's pooled tokens.
        weights: the gate layers' parameters, in ``summary``'s dtype.

    Returns:
        ``ChunkGates`` in ``summary``'s dtype.
    """
    check_gate_arguments(summary, weights)
    return gates_from_logits(F.linear(summary, *stacked(weights)), gate_sizes(weights)[0])


def stacked(weights: GateWeights) -> Tuple[Tensor, Tensor]:
    """The three layers as one: their weights' rows and their biases, in the
    logits' order (decay, momentum, step-size modulation)."""
    w = weights
    return (torch.cat([w.decay, w.momentum, w.lr_modulation]),
            torch.cat([w.decay_bias, w.momentum_bias, w.lr_modulation_bias]))


def gates_from_logits(logits: Tensor, heads: int) -> ChunkGates:
    """(B, U, (2 + K) H) decay, momentum and step-size modulation logits ->
    ``ChunkGates``: log(1 - alpha), log(eta) and rho, heads leading."""
    b, u = logits.shape[:2]
    h = heads
    log_keep = packed(F.logsigmoid(-logits[..., :h]).permute(2, 0, 1))
    log_momentum = packed(F.logsigmoid(logits[..., h:2 * h]).permute(2, 0, 1))
    lr_mod = torch.sigmoid(logits[..., 2 * h:]).view(b, u, h, -1)
    return ChunkGates(log_keep, log_momentum, packed(lr_mod.permute(3, 2, 0, 1)))


def packed(t: Tensor) -> Tensor:
    """A contiguous copy (``.contiguous()`` would first ask whether ``t`` is
    contiguous, a question about its sizes that symbolic shapes guard on)."""
    return t.clone(memory_format=torch.contiguous_format)
