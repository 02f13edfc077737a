"""The memory's PyTorch operations against their plain references, in float64."""
import pytest
import torch

from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_grads_naive,
                                                  chunk_grads_torch, chunk_read_naive,
                                                  chunk_read_torch, momentum_decay_states,
                                                  read_naive, read_torch, scan_states_naive)
from convneur_mm.models.layers.memory_ops.chunk_grads import chunk_grads


# block None: all steps in one block (the shape-generic graph for export)
@pytest.mark.parametrize('steps,block', [(1, 64), (7, 3), (16, 64), (130, 64), (9, 4),
                                         (1, None), (130, None)])
def test_momentum_decay_states_match_the_recursion(steps, block):
    gen = torch.Generator().manual_seed(steps)
    args = (torch.randn(3, steps, 5, generator=gen).double(),
            torch.rand(3, steps, generator=gen).double(),
            torch.nn.functional.logsigmoid(torch.randn(3, steps, generator=gen)).double(),
            torch.nn.functional.logsigmoid(torch.randn(3, steps, generator=gen)).double(),
            torch.randn(3, 5, generator=gen).double())
    fast = momentum_decay_states(*args, block_size=block)
    grads, lr_mod, log_keep, log_momentum, initial = args
    naive = scan_states_naive([grads], lr_mod[None], log_keep, log_momentum, [initial])[0]
    torch.testing.assert_close(fast, naive)


def test_momentum_decay_states_are_differentiable_in_every_input():
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 6, 3, generator=gen).double(), torch.rand(2, 6, generator=gen).double(),
            -torch.rand(2, 6, generator=gen).double(), -torch.rand(2, 6, generator=gen).double(),
            torch.randn(2, 3, generator=gen).double()]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(
        lambda *a: momentum_decay_states(*a, block_size=4), args)


def test_momentum_decay_states_survive_tiny_decays():
    # exp(cumsum) underflows over long sequences; the masked form must not NaN
    steps = 300
    out = momentum_decay_states(torch.ones(1, steps, 2), torch.ones(1, steps),
                                torch.full((1, steps), -50.0), torch.full((1, steps), -50.0),
                                torch.ones(1, 2))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, -1], -torch.ones(2), rtol=0, atol=1e-6)


def _weights(groups, d, gen):
    return MemoryWeights(torch.randn(groups, d, 4 * d, generator=gen).double() * 0.3,
                         torch.randn(groups, 4 * d, d, generator=gen).double() * 0.3,
                         torch.randn(groups, d, generator=gen).double() * 0.1)


def test_closed_form_grads_match_autograd_per_chunk():
    gen = torch.Generator().manual_seed(0)
    groups, chunks, length, d = 2, 3, 5, 6
    w = _weights(groups, d, gen)
    keys = torch.randn(groups, chunks, length, d, generator=gen).double()
    values = torch.randn(groups, chunks, length, d, generator=gen).double()
    lr = torch.rand(groups, chunks, length, generator=gen).double()
    fast = chunk_grads_torch(w, keys, values, lr)
    for got, want in zip(fast, chunk_grads_naive(w, keys, values, lr)):
        torch.testing.assert_close(got, want)
    # (G, B, U, L, d): U chunks per image, the same gradients as (G, B * U, L, d)
    per_image = chunk_grads(w, keys.unflatten(1, (1, chunks)), values.unflatten(1, (1, chunks)),
                            lr.unflatten(1, (1, chunks)), implementation='torch')
    for got, want in zip(per_image, fast):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="chunk_grads has the implementations .* got 'cuda'"):
        chunk_grads(w, keys, values, lr, implementation='cuda')


@pytest.mark.parametrize('decomposed', [False, True])
def test_chunk_read_matches_its_reference(decomposed):
    """Token n reads state n // L (a partial last chunk), heads merged; the
    decomposed read (dW with W_0 and a_t) equals the read of a_t W_0 + dW."""
    gen = torch.Generator().manual_seed(1)
    heads, batch, chunks, length, n, d = 2, 3, 3, 4, 10, 6
    states = _weights(heads * batch * chunks, d, gen).map(
        lambda t: t.view(heads, batch, chunks, *t.shape[1:]))
    queries = torch.randn(heads, batch, n, d, generator=gen).double()
    base = carry = None
    if decomposed:
        base = _weights(heads, d, gen)
        carry = torch.rand(heads, batch, chunks, generator=gen).double()
    got = chunk_read_torch(states, queries, length, None, base, carry)
    assert got.shape == (batch, n, heads * d)
    torch.testing.assert_close(got, chunk_read_naive(states, queries, length, base, carry))
    if decomposed:  # read_torch's decomposed products against the whole state's
        x = queries.reshape(heads * batch, n, d)
        delta = states.map(lambda t: t[:, :, 0].reshape(heads * batch, *t.shape[3:]))
        a = carry[:, :, 0].reshape(-1)
        torch.testing.assert_close(read_torch(delta, x, None, base, a),
                                   read_naive(delta, x, base, a))


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


def test_every_pytorch_implementation_and_dispatcher_takes_the_tanh_form_of_gelu():
    """``gelu_approximate='tanh'`` reaches each implementation (PyTorch, its
    closed form, the dispatchers) and gives the references' tanh results,
    which differ from the exact GELU's; an unknown form is an error."""
    from convneur_mm.models.layers.memory_ops import chunk_grads_closed_form, read_closed_form
    from convneur_mm.models.layers.memory_ops.chunk_read import chunk_read
    from convneur_mm.models.layers.memory_ops.read import read
    gen = torch.Generator().manual_seed(2)
    groups, chunks, length, d = 2, 3, 5, 6
    w = _weights(groups, d, gen)
    keys, values = (torch.randn(groups, chunks, length, d, generator=gen).double()
                    for _ in range(2))
    lr = torch.rand(groups, chunks, length, generator=gen).double()
    want = chunk_grads_naive(w, keys, values, lr, gelu_approximate='tanh')
    exact = chunk_grads_naive(w, keys, values, lr)
    assert min((a - b).abs().max() for a, b in zip(want, exact)) > 1e-6
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


def _projection_weights(d: int, heads: int, gen: torch.Generator, dtype=torch.float64):
    from convneur_mm.models.layers.memory_ops.project import ProjectionWeights, projection_shapes
    return ProjectionWeights(*(torch.randn(*s, generator=gen, dtype=dtype) * 0.5
                               for s in projection_shapes(d, heads)))


@pytest.mark.parametrize('tokens,chunk,heads,updates', [(20, 8, 2, 2), (24, 8, 1, 2),
                                                        (6, 8, 1, 0), (17, 4, 4, 4)])
def test_folded_projections_match_the_layers(tokens, chunk, heads, updates):
    """One product with the norms' weights folded in, against each norm and
    layer applied in turn (float64), and differentiable in every parameter."""
    from convneur_mm.models.layers.memory_ops.project import project, project_naive
    gen = torch.Generator().manual_seed(tokens)
    weights = _projection_weights(16, heads, gen)
    x = torch.randn(2, tokens, 16, generator=gen, dtype=torch.float64)
    got = project(x, weights, updates, chunk, 0.5)
    ref = project_naive(x, weights, updates, chunk, 0.5)
    for name, a, b in zip(got._fields, got, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    if updates:
        leaves = [t.clone().requires_grad_() for t in weights]
        assert torch.autograd.gradcheck(
            lambda *w: project(x[:1, :updates * chunk], type(weights)(*w), updates, chunk, 0.5),
            leaves)


def test_projections_refuse_bad_arguments():
    from convneur_mm.models.layers.memory_ops.project import project, project_triton
    gen = torch.Generator().manual_seed(0)
    weights = _projection_weights(16, 2, gen)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match='written chunks'):
        project(x, weights, 3, 8, 1.0)  # 24 written tokens of 20
    with pytest.raises(ValueError, match=r'weights.keys must be \(16, 16\)'):
        project(x, weights._replace(keys=weights.keys[:8]), 2, 8, 1.0)
    with pytest.raises(ValueError, match='implementations'):
        project(x, weights, 2, 8, 1.0, implementation='cuda')
    with pytest.raises(TypeError, match='float32'):
        project_triton(x, weights, 2, 8, 1.0)
    wide = _projection_weights(320, 2, gen, torch.float32)
    with pytest.raises(ValueError, match='widths up to 256'):
        project_triton(torch.randn(1, 20, 320), wide, 1, 8, 1.0)
    with pytest.raises(ValueError, match='block_features must be a power of two'):
        project_triton(x.float(), type(weights)(*(t.float() for t in weights)), 2, 8, 1.0,
                       block_features=24)
    for d in (144, 192):  # past 128, only M4's 160 compiled with bounded spills
        wider = _projection_weights(d, 1, gen, torch.float32)
        with pytest.raises(ValueError, match=r'differentiates widths up to 128 and \(160,\)'):
            project_triton(torch.randn(1, 20, d, requires_grad=True), wider, 1, 8, 1.0)


def test_triton_projections_allocate_their_results_only():
    """What the kernel's wrapper allocates (meta tensors, launches skipped):
    its results, the pool's log-sum-exp and the summaries' pooled rows, the
    folded weight and its 16-bit copy, the bias and gains; no copy of x (a
    strided view) and no (B, N, 4d + H) product."""
    from convneur_mm.models.layers.memory_ops import kernels
    from convneur_mm.models.layers.memory_ops.project import project_triton
    from convneur_mm.testing.dispatch_probes import LiveTensorBytes
    b, n, d, heads, chunk, updates = 4, 3136, 128, 1, 196, 15
    weights = _projection_weights(d, heads, torch.Generator().manual_seed(0), torch.float32)
    weights = type(weights)(*(t.to('meta') for t in weights))
    x = torch.empty(b, d, n, device='meta').transpose(1, 2)
    tokens = updates * chunk
    folded = (4 * d + heads) * d * (4 + 2) + (d + heads) * 4 + 2 * d * 4
    results = 4 * (b * n * d + 2 * b * tokens * d + b * tokens * heads + 3 * b * updates * d)
    with torch.no_grad(), kernels.without_launches(), LiveTensorBytes() as live:
        out = project_triton(x, weights, updates, chunk, 1.0, torch.bfloat16)
    assert [list(t.shape) for t in out] == [[heads, b, n, d], [heads, b, tokens, d],
                                           [heads, b, tokens, d], [heads, b, tokens],
                                           [b, updates, d]]
    assert live.peak <= results + folded, (live.peak, results, folded)
    assert live.peak >= results


def test_triton_scan_refuses_bad_arguments_and_allocates_its_states_only():
    from convneur_mm.models.layers.memory_ops import kernels
    from convneur_mm.models.layers.memory_ops.scan import scan_states_triton
    from convneur_mm.testing.dispatch_probes import LiveTensorBytes
    n, u, p = 4, 5, 64
    grads, gates = torch.zeros(n, u, p), torch.zeros(n, u)
    with pytest.raises(ValueError, match='as many'):
        scan_states_triton([grads], torch.zeros(2, n, u), gates, gates, [None])
    with pytest.raises(ValueError, match=r'grads\[0\] must be \(4, 5, P\)'):
        scan_states_triton([grads[:, :3]], gates[None], gates, gates, [None])
    with pytest.raises(TypeError, match='float32 grads'):
        scan_states_triton([grads.double()], gates[None], gates, gates, [None])
    with pytest.raises(ValueError, match='state dtypes'):
        scan_states_triton([grads], gates[None], gates, gates, [None], state_dtypes=[torch.int8])
    leaf = grads.clone().requires_grad_()
    with pytest.raises(RuntimeError, match='trains with float32 states'):
        scan_states_triton([leaf], gates[None], gates, gates, [None],
                           state_dtypes=[torch.bfloat16])
    with pytest.raises(ValueError, match='one device'):
        scan_states_triton([grads.to('meta')], gates[None], gates, gates, [None])
    with torch.no_grad(), kernels.without_launches(), pytest.raises(ValueError, match='2\*\*31'):
        # int32 offsets inside a row: P entries 2**20 elements apart
        strided = torch.empty_strided((2, 3, 4096), (3, 1, 2**20), device='meta')
        scan_states_triton([strided], torch.empty(1, 2, 3, device='meta'),
                           *[torch.empty(2, 3, device='meta')] * 2, [None])
    meta = lambda *shape: torch.empty(*shape, device='meta')  # noqa: E731
    # M3's stage 1 at batch 128: w1's states in bf16 cost half their float32 bytes
    n, u, p = 128, 15, 128 * 512
    args = ([meta(n, u, p)], meta(1, n, u), meta(n, u), meta(n, u), [meta(n, p)])
    with torch.no_grad(), kernels.without_launches(), LiveTensorBytes() as live:
        states = scan_states_triton(*args, state_dtypes=[torch.bfloat16])
    assert states[0].shape == (n, u + 1, p) and states[0].dtype == torch.bfloat16
    assert live.peak == n * (u + 1) * p * 2
