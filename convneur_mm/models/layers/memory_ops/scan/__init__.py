"""The scan: all states of the momentum/decay recursion from the chunks'
gradients, ``scan_states(grads, lr_mod, log_keep, log_momentum, initial,
block_size)`` in PyTorch (matrix products, differentiable), in Triton
(``scan_states_triton``, step by step, each state written in its own dtype;
with a backward kernel) and step by step in PyTorch (``scan_states_naive``, the
reference)."""
from .naive import scan_states_naive
from .pytorch import decay_carry, momentum_decay_states, scan_states
from .triton import scan_states_triton

__all__ = ['decay_carry', 'momentum_decay_states', 'scan_states', 'scan_states_naive',
           'scan_states_triton']
