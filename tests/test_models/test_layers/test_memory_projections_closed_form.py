"""memory_ops/project/closed_form.py: the projections' hand-derived backward
against autograd through ``project_torch``."""
from typing import List, Optional

import pytest
import torch

from convneur_mm.models.layers.memory_ops.project import (ProjectionWeights, project,
                                                          project_closed_form, project_torch,
                                                          projection_shapes)

# (batch, tokens, width, heads, written chunks, chunk): rows past the written
# chunks, every row written, one chunk, one head
SHAPES = [(2, 10, 8, 2, 2, 4), (2, 12, 8, 2, 3, 4), (3, 9, 16, 1, 1, 9), (1, 7, 12, 3, 2, 3)]


def _inputs(b: int, n: int, d: int, heads: int, dtype=torch.float64,
            seed: int = 0) -> List[torch.Tensor]:
    """x, then the ``ProjectionWeights`` in order, all leaves."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, n, d, generator=gen)] + [
        torch.randn(*size, generator=gen) * 0.5 for size in projection_shapes(d, heads)]
    return [t.to(dtype).requires_grad_() for t in tensors]


def _project(fn, u: int, L: int, mm: Optional[torch.dtype] = None, max_lr: float = 0.7):
    return lambda x, *w: tuple(fn(x, ProjectionWeights(*w), u, L, max_lr, mm))


def _outputs_and_grads(fn, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    outputs = fn(*inputs)
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    return list(outputs) + list(torch.autograd.grad(outputs, inputs, cotangents))


def _errors(ours: List[torch.Tensor], reference: List[torch.Tensor]) -> List[float]:
    """Each tensor's error relative to its norm, or to 1 below it: the pool's
    logits bias has a zero gradient (a softmax does not see a shift), which
    both compute as rounding noise."""
    return [((a - b).norm() / max(b.norm(), 1.0)).item() for a, b in zip(ours, reference)]


@pytest.mark.parametrize('shape', SHAPES)
def test_projections_pass_gradcheck(shape):
    b, n, d, heads, u, L = shape
    assert torch.autograd.gradcheck(_project(project_closed_form, u, L),
                                    _inputs(b, n, d, heads), fast_mode=True)


@pytest.mark.parametrize('output', range(5))
def test_gradcheck_with_one_output_alone(output):
    """Every other output unused: its cotangent comes as None."""
    fn = _project(project_closed_form, 2, 4)
    assert torch.autograd.gradcheck(lambda *t: fn(*t)[output], _inputs(2, 10, 8, 2),
                                    fast_mode=True)


def test_gradcheck_of_a_subset_of_inputs():
    inputs = _inputs(2, 10, 8, 2)
    for t in inputs[::2]:
        t.requires_grad_(False)
    assert torch.autograd.gradcheck(_project(project_closed_form, 2, 4), inputs,
                                    fast_mode=True)


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('shape', SHAPES)
def test_projections_match_autograd_of_the_pytorch_ops(shape, dtype, tol):
    b, n, d, heads, u, L = shape
    inputs = _inputs(b, n, d, heads, dtype)
    ours = _outputs_and_grads(_project(project_closed_form, u, L), inputs)
    reference = _outputs_and_grads(_project(project_torch, u, L), inputs)
    assert max(_errors(ours, reference)) < tol


def test_bfloat16_operands_round_as_the_pytorch_ops():
    """The same products with the same operands: the two agree far closer
    (measured <= 8e-6) than either does with float32 operands (>= 1e-3)."""
    inputs = _inputs(3, 12, 16, 1, torch.float32)
    ours = _outputs_and_grads(_project(project_closed_form, 3, 4, torch.bfloat16), inputs)
    reference = _outputs_and_grads(_project(project_torch, 3, 4, torch.bfloat16), inputs)
    exact = _outputs_and_grads(_project(project_torch, 3, 4), inputs)
    assert max(_errors(ours, reference)) < 1e-4
    assert max(_errors(ours, exact)) > 1e-3


def _traced(fn):
    """``fn`` traced by torch.compile (its compile-time branches taken) and
    run by AOTAutograd's eager backend: no kernel compiler, float64 exact."""
    torch._dynamo.reset()
    return torch.compile(fn, backend='aot_eager', fullgraph=True)


# the second shape is a `slow` case: one more compilation of the same graph
@pytest.mark.parametrize('shape', [SHAPES[0], pytest.param(SHAPES[1], marks=pytest.mark.slow)])
def test_under_torch_compile_the_gradient_is_joined_from_its_column_groups(shape):
    """Traced, the product's gradient is a cat of its column groups, not
    writes into slices of one buffer: the same gradients, with every output
    used and with each one alone (the others' groups zeros)."""
    b, n, d, heads, u, L = shape
    inputs = _inputs(b, n, d, heads)
    fn = _project(project_closed_form, u, L)
    for output in (None, *range(5)):
        pick = fn if output is None else (lambda *t, i=output: fn(*t)[i:i + 1])
        ours = _outputs_and_grads(_traced(pick), inputs)
        reference = _outputs_and_grads(pick, inputs)
        assert max(_errors(ours, reference)) < 1e-12, output


def test_without_writes_it_is_the_pytorch_ops():
    inputs = _inputs(2, 6, 8, 2)
    ours = _project(project_closed_form, 0, 8)(*inputs)
    reference = _project(project_torch, 0, 8)(*inputs)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_dispatcher_trains_through_it_when_asked():
    x, *w = _inputs(2, 10, 8, 2)

    def keys_grad_fn(backward: str) -> str:
        keys = project(x, ProjectionWeights(*w), 2, 4, 0.7, backward=backward).keys
        return keys.grad_fn.next_functions[0][0].name()

    assert '_Project' in keys_grad_fn('closed_form')
    assert '_Project' not in keys_grad_fn('autograd')


def test_create_graph_gets_a_clear_error():
    inputs = _inputs(2, 10, 8, 2)
    loss = sum(o.pow(2).sum() for o in _project(project_closed_form, 2, 4)(*inputs))
    with pytest.raises(RuntimeError, match='first order only'):
        torch.autograd.grad(loss, inputs, create_graph=True)


def test_bad_inputs_get_clear_errors():
    x, *w = _inputs(2, 10, 8, 2)
    with pytest.raises(ValueError, match='x must be'):
        project_closed_form(x[0], ProjectionWeights(*w), 2, 4, 0.7)
    with pytest.raises(ValueError, match='need that many'):
        project_closed_form(x, ProjectionWeights(*w), 3, 4, 0.7)
