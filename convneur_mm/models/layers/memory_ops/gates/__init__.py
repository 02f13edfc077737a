"""The gates: each written chunk's decay, momentum and step-size modulation
from its summary, ``chunk_gates(summary, weights, implementation)`` in
PyTorch (``chunk_gates_torch``, one product, differentiable), Triton
(``chunk_gates_triton``, one kernel; a PyTorch backward) and plainly, layer by
layer (``chunk_gates_naive``, the reference)."""
from torch import Tensor

from ..common import implementation_of
from .naive import chunk_gates_naive
from .pytorch import chunk_gates_torch, gates_from_logits, packed
from .triton import chunk_gates_triton
from .weights import ChunkGates, GateWeights, check_gate_arguments, gate_sizes

CHUNK_GATES_IMPLEMENTATIONS = {'torch': chunk_gates_torch, 'triton': chunk_gates_triton}


def chunk_gates(summary: Tensor, weights: GateWeights, implementation: str = 'torch'
                ) -> ChunkGates:
    """The gates by ``implementation`` ('torch' or 'triton'); the arguments
    as ``chunk_gates_torch``'s."""
    fn = implementation_of('chunk_gates', CHUNK_GATES_IMPLEMENTATIONS, implementation)
    return fn(summary, weights)


__all__ = ['CHUNK_GATES_IMPLEMENTATIONS', 'ChunkGates', 'GateWeights', 'check_gate_arguments',
           'chunk_gates', 'chunk_gates_naive', 'chunk_gates_torch', 'chunk_gates_triton',
           'gate_sizes', 'gates_from_logits', 'packed']
