"""Marks for ``torch.compile`` that import no Dynamo."""
from typing import Callable, TypeVar

Fn = TypeVar('Fn', bound=Callable)

# the mark torch.compiler.assume_constant_result sets: that decorator imports
# torch._dynamo first, about 1.7 s of every process that imports the models (a CPU)
DYNAMO_CONSTANT_MARK = '_dynamo_marked_constant'


def assume_constant_result(fn: Fn) -> Fn:
    """``torch.compiler.assume_constant_result`` without importing Dynamo:
    the compiler takes ``fn``'s result while tracing, as a constant (it is
    not re-checked, so ``fn`` must be a fact of the process)."""
    setattr(fn, DYNAMO_CONSTANT_MARK, True)
    return fn
