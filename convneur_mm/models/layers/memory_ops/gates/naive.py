"""The gates written plainly, layer by layer: the reference."""
import torch
from torch import Tensor

from .weights import ChunkGates, GateWeights, check_gate_arguments, gate_sizes


def chunk_gates_naive(summary: Tensor, weights: GateWeights) -> ChunkGates:
    """``chunk_gates`` with each layer applied in turn and exact products in
    ``summary``'s dtype (float64 for a reference): log(1 - sigmoid),
    log(sigmoid) and sigmoid as written."""
    check_gate_arguments(summary, weights)
    w = weights
    heads, k = gate_sizes(w)
    alpha = torch.sigmoid(summary @ w.decay.t() + w.decay_bias)
    eta = torch.sigmoid(summary @ w.momentum.t() + w.momentum_bias)
    rho = torch.sigmoid(summary @ w.lr_modulation.t() + w.lr_modulation_bias)
    rho = rho.unflatten(-1, (heads, k)).permute(3, 2, 0, 1)
    return ChunkGates(torch.log(1 - alpha).permute(2, 0, 1), torch.log(eta).permute(2, 0, 1), rho)
