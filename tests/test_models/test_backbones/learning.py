"""Which parameters a backward pass leaves without a gradient."""
from typing import List

from torch import nn

# the memory's pool logits bias shifts all of a chunk's tokens alike, which the
# pool's softmax over them does not see: its gradient is zero (exactly, in the
# closed-form backward; rounding, in autograd's)
SHIFT_INVARIANT = 'memory.pool.to_logits.bias'


def dead_parameters(model: nn.Module) -> List[str]:
    """The parameters with no gradient or an all-zero one, but those whose
    gradient is zero by construction (``SHIFT_INVARIANT``)."""
    return [name for name, p in model.named_parameters()
            if not name.endswith(SHIFT_INVARIANT) and
            (p.grad is None or not p.grad.count_nonzero())]
