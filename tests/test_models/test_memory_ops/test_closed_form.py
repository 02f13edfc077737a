"""The closed-form backward of the chunk gradients and the read, where one
test covers both: gradcheck, saved tensors and errors (the bytes of a training
step: benchmarks/tests/test_bytes.py)."""
import pytest
import torch
import torch.nn.functional as F

from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_grads_closed_form,
                                                  chunk_grads_torch, read_closed_form, read_torch)
from convneur_mm.models.layers.memory_ops.chunk_grads import chunk_grads
from convneur_mm.models.layers.memory_ops.common import gelu_second
from convneur_mm.testing.errors import least, worst

from .memory_cases import (_gradcheck, _outputs_and_grads, _read, _read_inputs, _relative_errors,
                           _write, _write_inputs64)


def test_gradcheck_of_a_subset_of_inputs():
    inputs = _write_inputs64(2, 2, 3, 4)
    for t in inputs[:3] + inputs[4:]:
        t.requires_grad_(False)
    assert _gradcheck(_write(chunk_grads_closed_form), inputs)
    inputs = _read_inputs(4, 2, 3, heads=2)
    for i in (1, 3, 4):
        inputs[i].requires_grad_(False)
    assert _gradcheck(_read(read_closed_form), inputs)


def _tanh(fn):
    """``fn`` with GELU's tanh form."""
    return lambda *args, **kwargs: fn(*args, gelu_approximate='tanh', **kwargs)


def test_the_tanh_form_of_gelu_passes_gradcheck():
    """The second derivative of GELU's tanh form (the write's backward needs
    gelu'') and the read's first, plain and decomposed (their backward
    takes gelu' on two branches)."""
    assert _gradcheck(_write(_tanh(chunk_grads_closed_form)), _write_inputs64(2, 3, 4, 4))
    for heads in (None, 2):
        assert _gradcheck(_read(_tanh(read_closed_form)), _read_inputs(2, 3, 4, heads=heads))


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_tanh_form_matches_autograd_and_differs_from_erf(dtype, tol):
    """Against autograd through the PyTorch ops with the tanh form; the
    exact GELU's results differ by more than the agreement (the form is used):
    the write, and the read plain and decomposed."""
    for wrap, closed, torch_ops, inputs in (
            (_write, chunk_grads_closed_form, chunk_grads_torch,
             _write_inputs64(2, 3, 7, 16, dtype=dtype)),
            (_read, read_closed_form, read_torch, _read_inputs(4, 9, 16, None, dtype=dtype)),
            (_read, read_closed_form, read_torch, _read_inputs(4, 9, 16, 2, dtype=dtype))):
        ours = _outputs_and_grads(wrap(_tanh(closed)), inputs)
        assert worst(_relative_errors(ours, _outputs_and_grads(wrap(_tanh(torch_ops)),
                                                             inputs))) < tol
        assert least(_relative_errors(ours, _outputs_and_grads(wrap(closed), inputs))) > 3 * tol


@pytest.mark.parametrize('what', ['write', 'read'])
def test_strided_inputs_and_broadcast_output_gradients(what):
    """Token inputs as transposed views, output gradients of stride 0 (a sum's
    backward gives such): the PyTorch ops' gradients all the same."""
    def strided(t: torch.Tensor) -> torch.Tensor:  # the same values, dims 1 and 2 swapped in memory
        return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    if what == 'write':
        ours, theirs = _write(chunk_grads_closed_form), _write(chunk_grads_torch)
        inputs = _write_inputs64(2, 3, 4, 8)
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
    inputs = _write_inputs64(1, 2, 8, 8, dtype=torch.float32)
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
    write_inputs = _write_inputs64(g_, c, L, d)
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
        inputs = _write_inputs64(1, 2, 3, 4)
        outputs = _write(chunk_grads_closed_form)(*inputs)
    else:
        inputs = _read_inputs(2, 3, 4, heads=None)
        outputs = (_read(read_closed_form)(*inputs), )
    loss = sum(o.pow(2).sum() for o in outputs)
    with pytest.raises(RuntimeError, match='first order only'):
        torch.autograd.grad(loss, inputs, create_graph=True)


def test_bad_inputs_get_clear_errors():
    w1, w2, g, keys, values, lr = _write_inputs64(2, 3, 4, 4)
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


def test_dispatchers_train_through_the_closed_form_when_asked():
    """``backward='closed_form'`` takes the PyTorch operations' training form
    (the same values); an unknown backward is an error naming the choices."""
    from convneur_mm.models.layers.memory_ops.chunk_read import chunk_read
    from convneur_mm.models.layers.memory_ops.read import read
    gen = torch.Generator().manual_seed(0)
    d = 4
    weights = MemoryWeights(*(torch.randn(*s, generator=gen).double().requires_grad_() for s in
                              ((2, d, 4 * d), (2, 4 * d, d), (2, d))))
    keys, values = torch.randn(2, 2, 3, 3, d, generator=gen).double().unbind(0)
    lr = torch.rand(2, 3, 3, generator=gen).double()
    states = weights.map(lambda t: t.view(1, 1, *t.shape))
    queries = torch.randn(1, 1, 5, d, generator=gen).double()
    calls = [lambda **kw: chunk_grads(weights, keys, values, lr, **kw)[0],
             lambda **kw: read(weights, queries[0].expand(2, 5, d), **kw),
             lambda **kw: chunk_read(states, queries, 3, **kw)]
    def nodes(t):  # the names of the autograd graph's nodes
        seen, todo = {}, [t.grad_fn]
        while todo:
            node = todo.pop()
            if node is not None and id(node) not in seen:
                seen[id(node)] = type(node).__name__
                todo += [n for n, _ in node.next_functions]
        return set(seen.values())

    for call, function in zip(calls, ['_ChunkGradsBackward', '_ReadBackward', '_ReadBackward']):
        plain, closed = call(), call(backward='closed_form')
        assert function in nodes(closed) and function not in nodes(plain)
        torch.testing.assert_close(closed, plain)
        with pytest.raises(ValueError, match='closed_form'):
            call(backward='manual')
