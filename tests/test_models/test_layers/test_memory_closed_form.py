"""The closed-form backward of the chunk gradients and the read: gradcheck in
float64, agreement with autograd through the PyTorch ops in float64, float32
and with bfloat16 operands, and what they save (the bytes of a
training step: benchmarks/tests/test_bytes.py).

Second order is not supported (the outer training needs first order only):
``create_graph=True`` raises."""
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F

from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_grads_closed_form,
                                                  chunk_grads_torch, read_closed_form, read_torch)
from convneur_mm.models.layers.memory_ops.common import gelu_second


def _weights(groups: int, d: int, gen: torch.Generator, dtype=torch.float64) -> MemoryWeights:
    """Weights at the model's scale (Xavier-like products, a small g)."""
    return MemoryWeights((torch.randn(groups, d, 4 * d, generator=gen) * d**-0.5).to(dtype),
                         (torch.randn(groups, 4 * d, d, generator=gen) * (4 * d)**-0.5).to(dtype),
                         (torch.randn(groups, d, generator=gen) * 0.1).to(dtype))


def _write_inputs(groups: int, chunks: int, length: int, d: int, seed: int = 0,
                  dtype=torch.float64) -> List[torch.Tensor]:
    """w1, w2, g, keys, values, token_lr, all requiring gradients."""
    gen = torch.Generator().manual_seed(seed)
    tensors = list(_weights(groups, d, gen)) + [
        torch.randn(groups, chunks, length, d, generator=gen),
        torch.randn(groups, chunks, length, d, generator=gen),
        torch.rand(groups, chunks, length, generator=gen)]
    return [t.to(dtype).requires_grad_() for t in tensors]


def _read_inputs(groups: int, tokens: int, d: int, heads: Optional[int], seed: int = 0,
                 dtype=torch.float64) -> List[torch.Tensor]:
    """w1, w2, g, x, then with ``heads`` base w1, base w2 and carry: the
    decomposed read, whose w1 and w2 are the small updates dW."""
    gen = torch.Generator().manual_seed(seed)
    tensors = list(_weights(groups, d, gen)) + [torch.randn(groups, tokens, d, generator=gen)]
    if heads:
        tensors[:2] = [t * 0.05 for t in tensors[:2]]
        tensors += list(_weights(heads, d, gen))[:2] + [torch.rand(groups, generator=gen)]
    return [t.to(dtype).requires_grad_() for t in tensors]


def _write(fn, mm: Optional[torch.dtype] = None):
    return lambda *t: tuple(fn(MemoryWeights(*t[:3]), *t[3:], mm))


def _read(fn, mm: Optional[torch.dtype] = None):
    def read(*t):
        if len(t) == 4:
            return fn(MemoryWeights(*t[:3]), t[3], mm)
        return fn(MemoryWeights(*t[:3]), t[3], mm, MemoryWeights(t[4], t[5], None), t[6])
    return read


def _gradcheck(fn, inputs: List[torch.Tensor]) -> bool:
    """float64 gradcheck in fast mode: random projections of both Jacobians
    instead of every entry (which takes minutes on two cores)."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def _outputs_and_grads(fn, inputs: List[torch.Tensor], seed: int = 1) -> List[torch.Tensor]:
    """fn's outputs and the gradients of every input from fixed random
    output gradients."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs, )
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    return list(outputs) + list(torch.autograd.grad(outputs, inputs, cotangents))


def _relative_errors(result: List[torch.Tensor], reference: List[torch.Tensor]) -> List[float]:
    return [((a.double() - b.double()).norm() / b.double().norm()).item()
            for a, b in zip(result, reference)]


@pytest.mark.parametrize('shape', [(1, 1, 1, 2), (2, 3, 4, 4), (1, 2, 5, 3), (3, 1, 2, 8)])
def test_chunk_grads_pass_gradcheck(shape):
    assert _gradcheck(_write(chunk_grads_closed_form), _write_inputs(*shape))


@pytest.mark.parametrize('output', [0, 1, 2])
def test_chunk_grads_pass_gradcheck_with_an_output_alone(output):
    # the other outputs' gradients reach the backward as None
    write = _write(chunk_grads_closed_form)
    assert _gradcheck(lambda *t: write(*t)[output], _write_inputs(2, 2, 3, 4))


@pytest.mark.parametrize('heads', [None, 1, 2])
@pytest.mark.parametrize('groups,tokens,d', [(2, 3, 4), (4, 1, 2)])
def test_read_passes_gradcheck(groups, tokens, d, heads):
    assert _gradcheck(_read(read_closed_form), _read_inputs(groups, tokens, d, heads))


def test_gradcheck_of_a_subset_of_inputs():
    inputs = _write_inputs(2, 2, 3, 4)
    for t in inputs[:3] + inputs[4:]:
        t.requires_grad_(False)
    assert _gradcheck(_write(chunk_grads_closed_form), inputs)
    inputs = _read_inputs(4, 2, 3, heads=2)
    for i in (1, 3, 4):
        inputs[i].requires_grad_(False)
    assert _gradcheck(_read(read_closed_form), inputs)


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('shape', [(1, 4, 16, 8), (2, 3, 7, 16)])
def test_chunk_grads_match_autograd_of_the_pytorch_ops(shape, dtype, tol):
    inputs = _write_inputs(*shape, dtype=dtype)
    ours = _outputs_and_grads(_write(chunk_grads_closed_form), inputs)
    reference = _outputs_and_grads(_write(chunk_grads_torch), inputs)
    assert max(_relative_errors(ours, reference)) < tol


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('heads', [None, 2])
def test_read_matches_autograd_of_the_pytorch_ops(heads, dtype, tol):
    inputs = _read_inputs(4, 9, 16, heads, dtype=dtype)
    ours = _outputs_and_grads(_read(read_closed_form), inputs)
    reference = _outputs_and_grads(_read(read_torch), inputs)
    assert max(_relative_errors(ours, reference)) < tol


def _tanh(fn):
    """``fn`` with GELU's tanh form."""
    return lambda *args, **kwargs: fn(*args, gelu_approximate='tanh', **kwargs)


def test_the_tanh_form_of_gelu_passes_gradcheck():
    """The second derivative of GELU's tanh form (the write's backward needs
    gelu'') and the read's first."""
    assert _gradcheck(_write(_tanh(chunk_grads_closed_form)), _write_inputs(2, 3, 4, 4))
    assert _gradcheck(_read(_tanh(read_closed_form)), _read_inputs(2, 3, 4, heads=2))


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_tanh_form_matches_autograd_and_differs_from_erf(dtype, tol):
    """Against autograd through the PyTorch ops with the tanh form; the
    exact GELU's results differ by more than the agreement (the form is used)."""
    for wrap, closed, torch_ops, inputs in (
            (_write, chunk_grads_closed_form, chunk_grads_torch,
             _write_inputs(2, 3, 7, 16, dtype=dtype)),
            (_read, read_closed_form, read_torch, _read_inputs(4, 9, 16, 2, dtype=dtype))):
        ours = _outputs_and_grads(wrap(_tanh(closed)), inputs)
        assert max(_relative_errors(ours, _outputs_and_grads(wrap(_tanh(torch_ops)),
                                                             inputs))) < tol
        assert min(_relative_errors(ours, _outputs_and_grads(wrap(closed), inputs))) > 3 * tol


# bfloat16 operands. float32 inputs: the products round as the PyTorch ops'
# do, so the results agree closer (measured <= 2.5e-4 relative for the
# chunk gradients, <= 2.4e-6 for the read) than these bounds, and these are
# below every difference from the float32-operand results (measured >= 2.7e-3;
# >= 2.6e-4 for the decomposed read, whose W_0 products stay float32).
# float64 inputs (the exact products of rounded operands): the rounding
# points differ, and each error against the exact result is within this
# factor of the PyTorch ops' own (measured 0.88-1.09).
GRADS_BF16_AGREEMENT, READ_BF16_AGREEMENT = 1e-3, 1e-4
BF16_ERROR_RATIO = 1.5


def _check_bfloat16(wrap, ours, theirs, inputs: List[torch.Tensor], agreement: float) -> None:
    """``ours`` against ``theirs`` (``wrap`` makes each a function of the
    inputs) with bfloat16 operands, as the bounds above say."""
    rounded = _outputs_and_grads(wrap(ours, torch.bfloat16), inputs)
    reference = _outputs_and_grads(wrap(theirs, torch.bfloat16), inputs)
    if inputs[0].dtype == torch.float32:
        assert max(_relative_errors(rounded, reference)) < agreement
        float32_operands = _outputs_and_grads(wrap(ours), inputs)
        assert min(_relative_errors(float32_operands, reference)) > agreement
    else:
        exact = _outputs_and_grads(wrap(theirs), inputs)
        for our_error, their_error in zip(_relative_errors(rounded, exact),
                                          _relative_errors(reference, exact)):
            assert 0 < our_error < BF16_ERROR_RATIO * their_error


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_chunk_grads_with_bfloat16_operands_round_as_the_pytorch_ops(dtype):
    _check_bfloat16(_write, chunk_grads_closed_form, chunk_grads_torch,
                    _write_inputs(2, 3, 16, 16, dtype=dtype), GRADS_BF16_AGREEMENT)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('heads', [None, 2])
def test_read_with_bfloat16_operands_rounds_as_the_pytorch_ops(heads, dtype):
    _check_bfloat16(_read, read_closed_form, read_torch,
                    _read_inputs(4, 16, 16, heads, dtype=dtype), READ_BF16_AGREEMENT)


@pytest.mark.parametrize('heads', [None, 2])
def test_the_read_saves_its_product_operands_in_their_dtype(heads):
    """With 16-bit operands the read saves the states and x (x in float32 for
    the decomposed read, whose W_0 products take it so) cast once, not the
    float32 tensors: the backward casts them no more, and they hold half."""
    w1, w2, g, x, *decomposed = _read_inputs(4, 16, 16, heads, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _read(read_closed_form, torch.bfloat16)(w1, w2, g, x, *decomposed)
    def dtypes(like: torch.Tensor) -> List[torch.dtype]:
        return sorted(str(t.dtype) for t in saved if t.shape == like.shape)

    assert dtypes(w1) == dtypes(w2) == ['torch.bfloat16']
    # x and H (G, M, d), H in float32
    x_dtype = 'torch.bfloat16' if heads is None else 'torch.float32'
    assert dtypes(x) == sorted([x_dtype, 'torch.float32'])
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (w1, w2, g, x))


@pytest.mark.parametrize('what', ['write', 'read'])
def test_strided_inputs_and_broadcast_output_gradients(what):
    """Token inputs as transposed views, output gradients of stride 0 (a sum's
    backward gives such): the PyTorch ops' gradients all the same."""
    def strided(t: torch.Tensor) -> torch.Tensor:  # the same values, dims 1 and 2 swapped in memory
        return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    if what == 'write':
        ours, theirs = _write(chunk_grads_closed_form), _write(chunk_grads_torch)
        inputs = _write_inputs(2, 3, 4, 8)
        inputs[3:5] = [strided(t) for t in inputs[3:5]]
    else:
        ours, theirs = _read(read_closed_form), _read(read_torch)
        inputs = _read_inputs(4, 6, 8, heads=2)
        inputs[3] = strided(inputs[3])
    outputs = [o if isinstance(o, tuple) else (o, ) for o in (ours(*inputs), theirs(*inputs))]
    cotangents = [torch.randn(*o.shape[:-2], 1, o.shape[-1], dtype=o.dtype).expand(o.shape)
                  for o in outputs[0]]
    for a, b in zip(*(torch.autograd.grad(o, inputs, cotangents) for o in outputs)):
        torch.testing.assert_close(a, b)


def test_autocast_leaves_the_products_in_float32():
    inputs = _write_inputs(1, 2, 8, 8, dtype=torch.float32)
    plain = _write(chunk_grads_closed_form)(*inputs)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cast = _write(chunk_grads_closed_form)(*inputs)
    for a, b in zip(cast, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)


def test_only_inputs_and_the_hidden_rows_are_saved():
    """Nothing as wide as 4d per token row: those are recomputed."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    g_, c, L, d = 2, 3, 5, 4
    write_inputs = _write_inputs(g_, c, L, d)
    read_inputs = _read_inputs(4, 5, d, heads=2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _write(chunk_grads_closed_form)(*write_inputs)
        _read(read_closed_form)(*read_inputs)
    inputs = {t.data_ptr() for t in write_inputs + read_inputs}
    others = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs]
    assert others == [(g_, c * L, d), (4, 5, d)]


@pytest.mark.parametrize('what', ['write', 'read'])
def test_create_graph_gets_a_clear_error(what):
    if what == 'write':
        inputs = _write_inputs(1, 2, 3, 4)
        outputs = _write(chunk_grads_closed_form)(*inputs)
    else:
        inputs = _read_inputs(2, 3, 4, heads=None)
        outputs = (_read(read_closed_form)(*inputs), )
    loss = sum(o.pow(2).sum() for o in outputs)
    with pytest.raises(RuntimeError, match='first order only'):
        torch.autograd.grad(loss, inputs, create_graph=True)


def test_bad_inputs_get_clear_errors():
    w1, w2, g, keys, values, lr = _write_inputs(2, 3, 4, 4)
    weights = MemoryWeights(w1, w2, g)
    with pytest.raises(ValueError, match='keys must be'):
        chunk_grads_closed_form(weights, keys[0], values, lr)
    with pytest.raises(ValueError, match='token_lr must have shape'):
        chunk_grads_closed_form(weights, keys, values, lr[:, :2])
    with pytest.raises(ValueError, match='w2 must have shape'):
        chunk_grads_closed_form(MemoryWeights(w1, w1, g), keys, values, lr)
    with pytest.raises(TypeError, match='one dtype'):
        chunk_grads_closed_form(weights, keys.float(), values, lr)
    r1, r2, rg, x, b1, b2, carry = _read_inputs(4, 3, 4, heads=2)
    with pytest.raises(ValueError, match='both base and carry'):
        read_closed_form(MemoryWeights(r1, r2, rg), x, None, MemoryWeights(b1, b2, None))
    with pytest.raises(ValueError, match='heads'):
        read_closed_form(MemoryWeights(r1[:3], r2[:3], rg[:3]), x[:3], None,
                               MemoryWeights(b1, b2, None), carry[:3])
    with pytest.raises(ValueError, match='x must be'):
        read_closed_form(MemoryWeights(r1, r2, rg), x[0])


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
def test_gelus_second_derivative_is_finite_for_large_float16_inputs(approximate):
    """x^2 and x^3 overflow float16 where gelu'' is tiny: no NaN there."""
    x = torch.tensor([-400.0, -60.0, -35.0, -3.0, -0.5, 0.0, 0.7, 2.0, 35.0, 60.0, 400.0],
                     dtype=torch.float64)
    want = torch.func.grad(torch.func.grad(
        lambda t: F.gelu(t, approximate=approximate)))
    want = torch.stack([want(t) for t in x])
    t, k = gelu_second(x.half(), approximate)
    assert t.dtype == torch.float16
    assert torch.allclose(k * t.double(), want, rtol=1e-2, atol=1e-3), (k * t.double(), want)
