"""The gates as one Triton kernel, a custom operator
``torch.ops.convneur_mm.memory_gates``: the three layers' products and the
gates' functions in one launch, where PyTorch takes ten small ones. Its
backward is PyTorch's (three small products)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..kernels.launcher import launch_config
from ..kernels.ops import (call_kernel_op, check_arguments, check_runnable, kernel_op,
                           register_first_order_autograd, weight_arguments)
from ..kernels.tiles import cdiv, next_pow2
from .pytorch import stacked
from .weights import ChunkGates, GateWeights, check_gate_arguments, gate_sizes

GATES_ROWS = 16  # (image, chunk) rows per program: the products' least tile
GATES_FEATURES = 64  # summary features per product step


def chunk_gates_triton(summary: Tensor, weights: GateWeights) -> ChunkGates:
    """``chunk_gates_torch`` in one kernel: float32 logits from IEEE
    products, the gates' functions in float32, differentiable.

    Args:
        summary: (B, U, d) float32, each written chunk's pooled tokens.
        weights: the gate layers' parameters, float32.

    Returns:
        ``ChunkGates``, float32, contiguous.
    """
    check_gate_arguments(summary, weights)
    check_arguments([('summary', summary, ('B', 'U', 'd'))] + weight_arguments(weights),
                    torch.float32, (None, None))
    return ChunkGates(*call_kernel_op(_gates_op, _gates, summary, *weights))


def _output_shapes(summary: Tensor, decay: Tensor, lr_modulation: Tensor
                   ) -> Tuple[Tuple[int, ...], ...]:
    b, u = summary.shape[:2]
    heads = decay.shape[0]
    return (heads, b, u), (heads, b, u), (lr_modulation.shape[0] // heads, heads, b, u)


def _gates(summary: Tensor, decay: Tensor, decay_bias: Tensor, momentum: Tensor,
           momentum_bias: Tensor, lr_modulation: Tensor, lr_modulation_bias: Tensor
           ) -> Tuple[Tensor, Tensor, Tensor]:
    """The operator's implementation: allocate and launch (checked arguments)."""
    check_runnable(summary, torch.float32, whole_rows=False)  # features walked in steps
    outputs = tuple(summary.new_empty(shape)
                    for shape in _output_shapes(summary, decay, lr_modulation))
    if outputs[0].numel():
        launch_gates(summary, GateWeights(decay, decay_bias, momentum, momentum_bias,
                                          lr_modulation, lr_modulation_bias), *outputs)
    return outputs


def launch_gates(summary: Tensor, weights: GateWeights, log_keep: Tensor, log_momentum: Tensor,
                 lr_mod: Tensor) -> None:
    """Launch the gates kernel: a program per ``GATES_ROWS`` (image, chunk)
    rows of ``summary`` (B, U, d), writing the contiguous ``ChunkGates`` layouts."""
    b, u, d = summary.shape
    heads, k = gate_sizes(weights)
    kernels, _ = launch_config('gates', torch.float32, summary.device)
    w = weights
    rows = b * u
    kernels.gates_kernel[(cdiv(rows, GATES_ROWS),)](
        summary, w.decay, w.decay_bias, w.momentum, w.momentum_bias, w.lr_modulation,
        w.lr_modulation_bias, log_keep, log_momentum, lr_mod, rows, u, d, heads, k,
        *summary.stride(), *w.decay.stride(), *w.momentum.stride(), *w.lr_modulation.stride(),
        w.decay_bias.stride(0), w.momentum_bias.stride(0), w.lr_modulation_bias.stride(0),
        BR=GATES_ROWS, BK=min(GATES_FEATURES, max(16, next_pow2(d))),
        BH=max(16, next_pow2(heads)), BL=max(16, next_pow2(k * heads)), num_warps=4)


_gates_op = kernel_op('memory_gates', _gates)


@_gates_op.register_fake
def _gates_fake(summary: Tensor, decay: Tensor, decay_bias: Tensor, momentum: Tensor,
                momentum_bias: Tensor, lr_modulation: Tensor, lr_modulation_bias: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(summary.new_empty(shape)
                 for shape in _output_shapes(summary, decay, lr_modulation))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, bar_keep: Optional[Tensor], bar_momentum: Optional[Tensor],
              bar_lr: Optional[Tensor]) -> tuple:
    """The logits recomputed (one small product), then by hand: d/dz of
    log(1 - sigmoid(z)) is -sigmoid(z), of log(sigmoid(z)) sigmoid(-z), of
    sigmoid(z) sigmoid(z) (1 - sigmoid(z)). Its products are PyTorch's, as
    the PyTorch path's backward (TF32 where a user allows it)."""
    summary, *params = ctx.saved_tensors
    w = GateWeights(*params)
    heads, k = gate_sizes(w)
    weight, bias = stacked(w)
    z = torch.addmm(bias, summary.flatten(0, 1), weight.t())
    rows = z.shape[0]

    def cotangent(bar: Optional[Tensor], shape: tuple) -> Tensor:
        return z.new_zeros(shape) if bar is None else bar
    # heads leading -> rows leading, the modulation's columns as h K + k
    bar_keep = cotangent(bar_keep, (heads, rows)).reshape(heads, rows).t()
    bar_momentum = cotangent(bar_momentum, (heads, rows)).reshape(heads, rows).t()
    bar_lr = cotangent(bar_lr, (k, heads, rows)).reshape(k, heads, rows).permute(2, 1, 0)
    sig = torch.sigmoid(z)
    dz = torch.cat([-bar_keep * sig[:, :heads], bar_momentum * (1 - sig[:, heads:2 * heads]),
                    bar_lr.reshape(rows, -1) * sig[:, 2 * heads:] * (1 - sig[:, 2 * heads:])],
                   dim=1)
    d_summary = (dz @ weight).view_as(summary)
    d_weight = dz.t() @ summary.flatten(0, 1)
    d_bias = dz.sum(dim=0)
    sizes = (heads, heads, k * heads)
    d_w, d_b = d_weight.split(sizes), d_bias.split(sizes)
    return d_summary, d_w[0], d_b[0], d_w[1], d_b[1], d_w[2], d_b[2]


register_first_order_autograd(_gates_op, _backward, _setup_context)
