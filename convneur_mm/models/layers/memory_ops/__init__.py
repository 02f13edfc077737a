"""The neural memory's operations, each with one signature and several
implementations (the layout of flash-linear-attention's ``ops``):

* ``read`` (one state per group): ``read_torch`` (``read_closed_form`` for
  training), ``read_triton``, ``read_naive``;
* ``chunk_grads`` (every chunk's write gradient at shared weights):
  ``chunk_grads_torch`` (``chunk_grads_closed_form`` for training),
  ``chunk_grads_triton``, ``chunk_grads_naive``;
* ``scan`` (the states of the momentum/decay recursion): ``scan_states``
  (matrix products), ``scan_states_triton`` (step by step),
  ``scan_states_naive``;
* ``chunk_read`` (chunk t reads state t; the decomposed read by its ``base``
  and ``carry`` arguments): ``chunk_read_torch``, ``chunk_read_triton``,
  ``chunk_read_naive``;
* ``project`` (x to queries, keys, values, step sizes and chunk summaries):
  ``project_torch`` (the norms' weights folded into one product),
  ``project_triton`` (one kernel; a second for its backward), ``project_naive``;
* ``gates`` (a chunk summary to its decay, momentum and step-size
  modulation): ``chunk_gates_torch`` (one product), ``chunk_gates_triton``
  (one kernel, a PyTorch backward), ``chunk_gates_naive``.

Each operation is a subpackage; ``read.read``, ``chunk_grads.chunk_grads``,
``chunk_read.chunk_read``, ``project.project`` and ``gates.chunk_gates`` call the implementation
named by their ``implementation`` argument ('torch' or 'triton'). The PyTorch
implementations are plain differentiable tensor ops, batched over any leading
dimensions, so the outer training differentiates through the inner update
without ``torch.autograd.grad`` in the forward pass. Their training form
(the dispatchers' ``backward='closed_form'``) is the same forward as a
``torch.autograd.Function`` whose backward is derived by hand (no double
backward): ``chunk_grads_closed_form``, ``read_closed_form``, which
``chunk_read_torch`` reads through. The Triton ones are custom operators
(``torch.ops.convneur_mm``, kept whole by ``torch.compile``; the memory's
``implementation`` says where they run) with backward kernels of their own; the references take
exact products in their inputs' dtype (float64 in the tests). ``common`` holds what
they share: ``MemoryWeights``, ``product`` (the products' operand dtype),
``LN_EPS``, ``RMS_EPS``, ``ln_backward`` and the closed forms' checks.
"""
from .chunk_grads import (CHUNK_GRADS_IMPLEMENTATIONS, chunk_grads_closed_form,
                          chunk_grads_naive, chunk_grads_torch, chunk_grads_triton)
from .chunk_read import (CHUNK_READ_IMPLEMENTATIONS, chunk_read_naive, chunk_read_torch,
                         chunk_read_triton)
from .common import LN_EPS, RMS_EPS, MemoryWeights, product
from .read import READ_IMPLEMENTATIONS, read_closed_form, read_naive, read_torch, read_triton
from .scan import (decay_carry, momentum_decay_states, scan_states, scan_states_naive,
                   scan_states_triton)

# the operations' dispatchers are their subpackages' own (``read.read``):
# exported here, they would shadow the subpackages of the same names
__all__ = ['CHUNK_GRADS_IMPLEMENTATIONS', 'CHUNK_READ_IMPLEMENTATIONS', 'LN_EPS', 'RMS_EPS',
           'MemoryWeights', 'READ_IMPLEMENTATIONS', 'chunk_grads_closed_form', 'chunk_grads_naive',
           'chunk_grads_torch', 'chunk_grads_triton', 'chunk_read_naive', 'chunk_read_torch',
           'chunk_read_triton', 'decay_carry', 'momentum_decay_states', 'product',
           'read_closed_form', 'read_naive', 'read_torch', 'read_triton', 'scan_states',
           'scan_states_naive', 'scan_states_triton']
