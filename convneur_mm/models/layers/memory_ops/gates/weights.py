"""The gates' parameters and results."""
from typing import NamedTuple

from torch import Tensor


class GateWeights(NamedTuple):
    """The three gate layers' parameters: ``decay`` and ``momentum`` (H, d)
    with biases (H), ``lr_modulation`` (K H, d) with its bias (K H), row
    ``h K + k`` head h's modulation of weight tensor k (K = 3: w1, w2, g)."""
    decay: Tensor
    decay_bias: Tensor
    momentum: Tensor
    momentum_bias: Tensor
    lr_modulation: Tensor
    lr_modulation_bias: Tensor


class ChunkGates(NamedTuple):
    """Each written chunk's gates, heads leading and contiguous (flattening
    (H, B) is a view): ``log_keep`` = log(1 - alpha) and ``log_momentum`` =
    log(eta), (H, B, U); ``lr_mod`` rho, (K, H, B, U)."""
    log_keep: Tensor
    log_momentum: Tensor
    lr_mod: Tensor


def gate_sizes(weights: GateWeights) -> tuple:
    """(H, K): heads, and weight tensors each head's step size modulates."""
    heads = weights.decay.shape[0]
    return heads, weights.lr_modulation.shape[0] // max(heads, 1)


def check_gate_arguments(summary: Tensor, weights: GateWeights) -> None:
    """Shapes of a ``chunk_gates`` call: an error naming the argument."""
    if summary.dim() != 3:
        raise ValueError(f'summary must be (B, U, d), got shape {tuple(summary.shape)}')
    d = summary.shape[-1]
    heads, k = gate_sizes(weights)
    rows = weights.lr_modulation.shape[0]
    if heads == 0:
        raise ValueError('weights.decay has no rows: the gates need at least one head')
    if rows == 0 or rows % heads:
        raise ValueError(f'weights.lr_modulation has {rows} rows: not a positive multiple of '
                         f'the {heads} heads')
    shapes = dict(decay=(heads, d), decay_bias=(heads, ), momentum=(heads, d),
                  momentum_bias=(heads, ), lr_modulation=(k * heads, d),
                  lr_modulation_bias=(k * heads, ))
    for name, shape in shapes.items():
        got = tuple(getattr(weights, name).shape)
        if got != shape:
            raise ValueError(f'weights.{name} must be {shape} for a summary of width {d} and '
                             f'{heads} heads, got {got}')
