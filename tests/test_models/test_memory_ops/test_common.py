"""What every implementation shares (``memory_ops.common``): ``product``'s
operand dtypes, the tanh form of GELU, and the op counter."""
import pytest
import torch

from convneur_mm.models.layers.memory_ops import (chunk_grads_naive, chunk_grads_torch,
                                                  chunk_read_naive, read_naive, read_torch)
from convneur_mm.models.layers.memory_ops.chunk_grads import chunk_grads
from convneur_mm.testing.errors import least

from .memory_cases import _op_weights


def test_every_pytorch_implementation_and_dispatcher_takes_the_tanh_form_of_gelu():
    """``gelu_approximate='tanh'`` reaches each implementation (PyTorch, its
    closed form, the dispatchers) and gives the references' tanh results,
    which differ from the exact GELU's; an unknown form is an error."""
    from convneur_mm.models.layers.memory_ops import chunk_grads_closed_form, read_closed_form
    from convneur_mm.models.layers.memory_ops.chunk_read import chunk_read
    from convneur_mm.models.layers.memory_ops.read import read
    gen = torch.Generator().manual_seed(2)
    groups, chunks, length, d = 2, 3, 5, 6
    w = _op_weights(groups, d, gen)
    keys, values = (torch.randn(groups, chunks, length, d, generator=gen).double()
                    for _ in range(2))
    lr = torch.rand(groups, chunks, length, generator=gen).double()
    want = chunk_grads_naive(w, keys, values, lr, gelu_approximate='tanh')
    exact = chunk_grads_naive(w, keys, values, lr)
    assert least((a - b).abs().max() for a, b in zip(want, exact)) > 1e-6
    for got in (chunk_grads_torch(w, keys, values, lr, gelu_approximate='tanh'),
                chunk_grads_closed_form(w, keys, values, lr, gelu_approximate='tanh'),
                chunk_grads(w, keys, values, lr, gelu_approximate='tanh', backward='closed_form')):
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)
    x = torch.randn(groups, 7, d, generator=gen).double()
    want = read_naive(w, x, gelu_approximate='tanh')
    for fn in (read_torch, read_closed_form, read):
        torch.testing.assert_close(fn(w, x, gelu_approximate='tanh'), want)
    states = w.map(lambda t: t.view(1, groups, 1, *t.shape[1:]))
    queries = x[:, :length].unsqueeze(0)
    torch.testing.assert_close(
        chunk_read(states, queries, length, gelu_approximate='tanh'),
        chunk_read_naive(states, queries, length, gelu_approximate='tanh'))
    for fn in (read_torch, read_closed_form, read_naive, read):
        with pytest.raises(ValueError, match="gelu_approximate must be one of .*'erf'"):
            fn(w, x, gelu_approximate='erf')
    with pytest.raises(ValueError, match='gelu_approximate'):
        chunk_grads_torch(w, keys, values, lr, gelu_approximate='erf')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_product_takes_operands_already_cast(dtype):
    """An operand already in the operand dtype is not cast again: the same
    product, in the other operand's dtype or in ``out_dtype``."""
    from convneur_mm.models.layers.memory_ops import product
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 5, 6, generator=gen).to(dtype),
            torch.randn(2, 6, 3, generator=gen).to(dtype))
    want = product(a, b, torch.bfloat16)
    assert want.dtype == dtype
    for got in (product(a.bfloat16(), b, torch.bfloat16), product(a, b.bfloat16(), torch.bfloat16),
                product(a.bfloat16(), b.bfloat16(), torch.bfloat16, dtype)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert product(a.bfloat16(), b.bfloat16(), torch.bfloat16).dtype == torch.bfloat16


def test_products_on_meta_tensors_write_float32_as_on_cuda():
    """Byte counts on meta tensors are CUDA's: a 16-bit product writes
    float32 itself (no widening cast), and under autograd so do its
    gradients: the backward casts only the incoming gradient."""
    from convneur_mm.models.layers.memory_ops import product
    from convneur_mm.testing.dispatch_probes import AtenOpCounter
    a, b = torch.empty(2, 5, 6, device='meta'), torch.empty(2, 6, 3, device='meta')
    with AtenOpCounter() as counter:
        assert product(a, b, torch.bfloat16).dtype == torch.float32
    assert counter.kernels == {'_to_copy': 2, 'bmm': 1}
    a.requires_grad_(), b.requires_grad_()
    with AtenOpCounter() as counter:
        out = product(a, b, torch.bfloat16)
        assert out.dtype == torch.float32
    assert counter.kernels == {'_to_copy': 2, 'bmm': 1}
    with AtenOpCounter() as counter:
        out.backward(torch.empty_like(out))
    assert counter.kernels == {'_to_copy': 1, 'bmm': 2}
    assert (a.grad.dtype, b.grad.dtype) == (torch.float32, torch.float32)


def test_float16_products_under_autograd_differentiate_on_cuda_devices():
    """CUDA's (and meta's) float32-output product has no derivative: float16
    operands under autograd take the 16-bit product, widened, as on a CPU;
    outside autograd the float32 output."""
    from convneur_mm.models.layers.memory_ops import product
    from convneur_mm.testing.dispatch_probes import AtenOpCounter
    a, b = (torch.empty(2, 5, 6, device='meta', requires_grad=True),
            torch.empty(2, 6, 3, device='meta', requires_grad=True))
    with AtenOpCounter() as counter:
        out = product(a, b, torch.float16)
    assert out.dtype == torch.float32 and counter.kernels == {'_to_copy': 3, 'bmm': 1}
    out.backward(torch.empty_like(out))
    assert (a.grad.dtype, b.grad.dtype) == (torch.float32, torch.float32)
    with torch.no_grad(), AtenOpCounter() as counter:
        assert product(a, b, torch.float16).dtype == torch.float32
    assert counter.kernels == {'_to_copy': 2, 'bmm': 1}


def test_a_float16_memory_trains_with_autograd_on_cuda_devices():
    """The memory's autograd backward with float16 operands, on meta
    tensors (the products CUDA runs): every parameter gets a gradient."""
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    memory = NeuralMemory(32, chunk_size=8, heads=2, operand_dtype='float16',
                          implementation='torch', backward='autograd').to('meta')
    memory(torch.empty(2, 20, 32, device='meta')).sum().backward()
    assert all(p.grad is not None for p in memory.parameters() if p.requires_grad)


def test_bf16_products_have_autograds_gradients_through_the_casts():
    """On a CPU (bf16 results, widened) the product's own backward computes
    what autograd through the casts computes, bit for bit; an operand the
    caller cast already gets its gradient in its dtype; one that needs no
    gradient leaves the other operand unsaved; a second-order backward is
    refused, not silently wrong. float16 operands keep autograd through the
    casts, whose float16 tensors the fp16-headroom tool hooks."""
    from convneur_mm.models.layers.memory_ops import product
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 8, 4, generator=gen)
    grad = torch.randn(3, 5, 4, generator=gen)
    want = [t.clone().requires_grad_() for t in (a, b)]
    torch.bmm(want[0].bfloat16(), want[1].bfloat16()).float().backward(grad)
    got = [t.clone().requires_grad_() for t in (a, b)]
    out = product(*got, torch.bfloat16)
    assert out.dtype == torch.float32 and out.grad_fn.name() == '_Product16Backward'
    out.backward(grad)
    for g, w in zip(got, want):
        assert torch.equal(g.grad, w.grad)
    a16 = a.bfloat16().requires_grad_()
    product(a16, got[1], torch.bfloat16).backward(grad)
    assert a16.grad.dtype == torch.bfloat16
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        saved = []
        product(got[0], b, torch.bfloat16)  # b needs no gradient: a16 is not saved
    assert [t.shape for t in saved] == [b.shape]
    (first, ) = torch.autograd.grad(product(*got, torch.bfloat16).square().sum(), got[0])
    assert first.shape == a.shape
    with pytest.raises(RuntimeError, match='first order only'):
        torch.autograd.grad(product(*got, torch.bfloat16).square().sum(), got[0],
                            create_graph=True)
    assert product(*got, torch.float16).grad_fn.name() == 'ToCopyBackward0'


@pytest.mark.parametrize('dtype', [None, torch.bfloat16, torch.float16])
def test_gelu_grad_operand_writes_the_cast_values_in_one_kernel(dtype):
    """``gelu'(pre) * grad`` in the operand dtype: the values of the float32
    result cast, written by gelu_backward itself; in place without one."""
    from convneur_mm.models.layers.memory_ops.common import gelu_grad_operand
    from convneur_mm.testing.dispatch_probes import AtenOpCounter
    gen = torch.Generator().manual_seed(0)
    grad, pre = (torch.randn(3, 7, 8, generator=gen) * 3 for _ in range(2))
    want = torch.ops.aten.gelu_backward(grad, pre).to(dtype or torch.float32)
    given = grad.clone()
    with AtenOpCounter() as counter:
        got = gelu_grad_operand(given, pre, dtype)
    assert counter.kernels == {'gelu_backward': 1}
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got.data_ptr() == given.data_ptr()) == (dtype is None)


def test_op_counter_counts_allocations_as_nothing_and_out_tensors_as_written():
    from convneur_mm.testing.dispatch_probes import AtenOpCounter
    a = torch.empty(10, device='meta')
    out = torch.empty(10, device='meta', dtype=torch.bfloat16)
    with AtenOpCounter() as counter:
        torch.empty_like(a)
        torch.ops.aten.gelu_backward.grad_input(a, a, grad_input=out)
        a.add_(a)
    assert counter.kernels == {'gelu_backward': 1, 'add_': 1}
    # two float32 arguments read, the bfloat16 result written; add_ reads self twice, writes it
    assert counter.bytes == {'gelu_backward': 2 * 40 + 20, 'add_': 3 * 40}


def test_op_counter_counts_ops_with_empty_results_as_nothing():
    """A GPU launches no kernel for a result without elements: a product of
    an empty operand into a non-empty result (zeros) still counts."""
    from convneur_mm.testing.dispatch_probes import AtenOpCounter
    empty, full = torch.empty(1, 0, 4, device='meta'), torch.empty(1, 3, 4, device='meta')
    with AtenOpCounter() as counter:
        empty * 2
        empty.sum(dim=1)  # (1, 4) of zeros: a fill
        torch.bmm(full, torch.empty(1, 4, 0, device='meta'))
        torch.bmm(torch.empty(1, 3, 0, device='meta'), empty)  # inner size 0: zeros
        empty.view(4, 0)
    assert counter.kernels == {'sum': 1, 'bmm': 1}
    assert counter.views == {'view': 1}
