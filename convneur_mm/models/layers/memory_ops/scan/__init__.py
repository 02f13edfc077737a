"""The scan: all states of the momentum/decay recursion from the chunks'
gradients, ``scan_states(grads, lr_mod, log_keep, log_momentum, initial,
block_size)`` in PyTorch, and step by step (``scan_states_naive``, the
reference). It has no Triton implementation."""
from .naive import scan_states_naive
from .pytorch import decay_carry, momentum_decay_states, scan_states

__all__ = ['decay_carry', 'momentum_decay_states', 'scan_states', 'scan_states_naive']
