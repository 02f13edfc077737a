"""The fast neural memory against a plain autograd reference, in float64."""
import dataclasses

import pytest
import torch

from convneur_mm.models.layers.neural_memory import AttentionPool, NeuralMemory, plain_layers
from convneur_mm.testing.errors import worst
from convneur_mm.testing.memory_reference import reference_memory


def _perturbed_memory(dim, seed, **kwargs):
    torch.manual_seed(seed)
    memory = NeuralMemory(dim, **kwargs).double()
    with torch.no_grad():  # move every parameter off its special init value
        for p in memory.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return memory


# (chunk_size, tokens, heads, scan_block): N multiple of L, N not a multiple,
# N < L, N == L, states solved over several blocks
CASES = [(5, 20, 1, 64), (5, 23, 1, 64), (4, 16, 2, 64), (7, 3, 1, 64), (6, 6, 1, 64),
         (3, 40, 2, 4)]


# 'parallel-generic': the shape-generic graph that torch.export traces (every
# chunk writes, one scan block), in eager mode
@pytest.mark.parametrize('update', ['parallel', 'sequential', 'parallel-generic'])
@pytest.mark.parametrize('chunk,tokens,heads,scan_block', CASES)
def test_fast_path_matches_autograd_reference(update, chunk, tokens, heads, scan_block,
                                              device='cpu'):
    memory = _perturbed_memory(12, seed=chunk * 100 + tokens, chunk_size=chunk,
                               heads=heads, update=update.split('-')[0], max_lr=0.7,
                               scan_block=scan_block).to(device)
    x = torch.randn(2, tokens, 12, dtype=torch.float64, requires_grad=True, device=device)
    if update.endswith('generic'):
        out = memory.execute(x, dataclasses.replace(memory.plan(x), shape_generic=True))
    else:
        out = memory(x)
    ref = reference_memory(memory, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)

    probe = torch.randn_like(out)
    params = [x] + list(memory.parameters())
    fast = torch.autograd.grad((out * probe).sum(), params)
    slow = torch.autograd.grad((ref * probe).sum(), params, allow_unused=True)
    names = ['input'] + [n for n, _ in memory.named_parameters()]
    for name, f, s in zip(names, fast, slow):
        s = torch.zeros_like(f) if s is None else s  # unused by the reference
        torch.testing.assert_close(f, s, rtol=0, atol=1e-6, msg=f'gradient of {name}')


@pytest.mark.parametrize('update,backward', [('parallel', 'autograd'),
                                             ('parallel', 'closed_form'),
                                             ('sequential', 'closed_form')])
def test_the_tanh_form_of_gelu_matches_the_reference_with_it(update, backward):
    """``gelu_approximate='tanh'`` on every op of the path (write, scan, read,
    one-chunk read), outputs and gradients as the reference's tanh model; the
    exact GELU's outputs differ."""
    memory = _perturbed_memory(12, seed=7, chunk_size=5, update=update, backward=backward,
                               gelu_approximate='tanh')
    for tokens in (23, 4):  # writes, and a single chunk
        x = torch.randn(2, tokens, 12, dtype=torch.float64, requires_grad=True)
        out, ref = memory(x), reference_memory(memory, x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        params = [x] + list(memory.parameters())
        fast = torch.autograd.grad(out.square().sum(), params)
        slow = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
        for f, s in zip(fast, slow):
            torch.testing.assert_close(f, torch.zeros_like(f) if s is None else s, rtol=0,
                                       atol=1e-6)
        memory.gelu_approximate = 'none'
        with torch.no_grad():
            assert (memory(x) - out).abs().max() > 1e-6
        memory.gelu_approximate = 'tanh'


def test_memory_changes_with_update_mode_and_reads_earlier_chunks():
    par = _perturbed_memory(8, seed=1, chunk_size=4, update='parallel')
    seq = _perturbed_memory(8, seed=1, chunk_size=4, update='sequential')
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    assert not torch.allclose(par(x), seq(x))
    # chunk 1 reads W_0 only, so editing a later chunk leaves it alone, while
    # the last chunk sees the edit of an earlier chunk through the memory
    edited = x.clone()
    edited[:, 4:8] += 1.0
    a, b = par(x), par(edited)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_memory_state_does_not_leak_between_images():
    memory = _perturbed_memory(8, seed=2, chunk_size=4)
    x = torch.randn(3, 14, 8, dtype=torch.float64)
    together = memory(x)
    for i in range(3):
        torch.testing.assert_close(together[i:i + 1], memory(x[i:i + 1]))


def test_single_chunk_gives_write_path_exact_zero_gradients():
    memory = _perturbed_memory(8, seed=3, chunk_size=16)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    memory(x).sum().backward()
    for name, p in memory.named_parameters():
        assert p.grad is not None, name
    write_only = {id(p) for p in memory.update_parameters()}
    for name, p in memory.named_parameters():
        if id(p) in write_only:
            assert torch.count_nonzero(p.grad) == 0, name
        elif name in ('to_queries.weight', 'init_w1', 'init_w2'):
            assert torch.count_nonzero(p.grad) > 0, name


def test_inner_loop_stays_float32_under_autocast():
    memory = NeuralMemory(16, chunk_size=8)
    seen = []
    handle = memory.to_keys.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 40, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = memory(x.bfloat16())
    handle.remove()
    assert seen == [torch.float32]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), memory(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('kwargs,match', [
    (dict(dim=10, heads=3), 'divisible'),
    (dict(dim=8, update='fast'), 'update'),
    (dict(dim=8, chunk_size=0), 'chunk_size'),
    (dict(dim=8, max_lr=0), 'max_lr'),
    (dict(dim=8, max_lr=float('inf')), 'max_lr must be a finite number'),
    (dict(dim=8, max_lr=float('nan')), 'max_lr'),
    (dict(dim=8, max_lr='1e-3'), 'max_lr'),
    (dict(dim=8, chunk_size=2.5), 'chunk_size must be an int'),
    (dict(dim=8, chunk_size=True), 'chunk_size must be an int'),
    (dict(dim=8, scan_block=2.5), 'scan_block'),
    (dict(dim=8, heads=0), 'heads must be an int >= 1'),
    (dict(dim=8, heads=2.0), 'heads'),
    (dict(dim=0), 'dim must be an int >= 1'),
])
def test_bad_memory_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralMemory(**kwargs)


def test_integer_features_are_refused_not_truncated():
    with pytest.raises(TypeError, match='floating-point features, got torch.int64'):
        NeuralMemory(8, chunk_size=4)(torch.ones(1, 8, 8, dtype=torch.long))


def test_former_key_names_still_work_with_a_warning():
    """``matmul_dtype`` and ``kernels`` (the former names of ``operand_dtype``
    and ``implementation``) build the same memory, each with a
    ``FutureWarning`` naming its new key and pointing at the caller."""
    with pytest.warns(FutureWarning) as record:
        old = NeuralMemory(8, chunk_size=4, matmul_dtype='bfloat16', kernels='torch')
    assert [str(w.message) for w in record] == [
        "NeuralMemory: 'matmul_dtype' is deprecated; use 'operand_dtype' (the same values)",
        "NeuralMemory: 'kernels' is deprecated; use 'implementation' (the same values)"]
    assert {w.filename for w in record} == {__file__}
    new = NeuralMemory(8, chunk_size=4, operand_dtype='bfloat16', implementation='torch')
    assert (old.operand_dtype, old.implementation) == ('bfloat16', 'torch')
    x = torch.randn(2, 12, 8)
    assert old.plan(x) == new.plan(x)
    with pytest.warns(FutureWarning, match='use NeuralMemory.implementation'):
        old.kernels = 'auto'  # a script setting the former attribute still steers the path
    assert old.implementation == 'auto'
    with pytest.warns(FutureWarning, match='use NeuralMemory.operand_dtype'):
        assert old.matmul_dtype == 'bfloat16'


@pytest.mark.parametrize('old,new', [('matmul_dtype', 'operand_dtype'),
                                     ('kernels', 'implementation')])
def test_a_former_key_beside_its_new_one_is_an_error(old, new):
    value = {'operand_dtype': 'float32', 'implementation': 'torch'}[new]
    with pytest.raises(ValueError, match=f"both '{old}' and '{new}'"):
        NeuralMemory(8, **{old: value, new: value})


@pytest.mark.parametrize('old,new,bad', [('matmul_dtype', 'operand_dtype', 'fp8'),
                                         ('kernels', 'implementation', 'cuda')])
def test_a_bad_value_under_a_former_key_names_the_new_key(old, new, bad):
    with pytest.warns(FutureWarning), pytest.raises(ValueError,
                                                         match=f'{new} must be one of'):
        NeuralMemory(8, **{old: bad})


@pytest.mark.parametrize('shape_generic', [False, True])
@pytest.mark.parametrize('chunk,tokens,heads,scan_block', CASES)
def test_folded_projections_equal_the_layers(chunk, tokens, heads, scan_block, shape_generic):
    """One product with the norms' weights folded in (the default path) against
    each layer called; parameters and state-dict keys are the layers' own."""
    memory = _perturbed_memory(12, seed=tokens, chunk_size=chunk, heads=heads,
                               scan_block=scan_block)
    x = torch.randn(2, tokens, 12, dtype=torch.float64)
    u = memory.num_updates(tokens)
    if shape_generic:  # every chunk writes, zero-padded to a whole chunk
        u = -(-tokens // chunk)
        x = torch.nn.functional.pad(x, (0, 0, 0, u * chunk - tokens))
    plan = memory.plan(x)
    assert plan.projections == 'torch'  # plain layers: the default
    folded = memory.project(x, u, plan)
    layers = memory.project(x, u, dataclasses.replace(plan, projections='layers'))
    for name, f, s in zip(folded._fields, folded, layers):
        if s is None:
            assert f is None, name
            continue
        torch.testing.assert_close(f, s, rtol=0, atol=1e-12, msg=name)


def test_memory_state_dict_keys_are_unchanged():
    keys = set(NeuralMemory(8, heads=2).state_dict())
    assert keys == {
        'store_norm.weight', 'retrieve_norm.weight', 'to_keys.weight', 'to_values.weight',
        'to_queries.weight', 'key_gamma', 'query_gamma', 'to_token_lr.weight',
        'to_token_lr.bias', 'pool.to_logits.weight', 'pool.to_logits.bias',
        'to_decay.weight', 'to_decay.bias', 'to_momentum.weight', 'to_momentum.bias',
        'to_lr_modulation.weight', 'to_lr_modulation.bias', 'init_w1', 'init_w2', 'init_g'}


@pytest.mark.parametrize('max_lr, operand_dtype, exact', [
    (1e-3, 'bfloat16', True), (1.0, 'bfloat16', False), (1e-3, 'float32', False)])
def test_a_decomposed_read_asks_the_projections_for_exact_queries(monkeypatch, max_lr,
                                                                  operand_dtype, exact):
    from convneur_mm.models.layers import neural_memory
    seen = []
    real = neural_memory.project

    def project(*args, **kwargs):
        seen.append((args[5], kwargs['exact_queries']))
        return real(*args, **kwargs)

    monkeypatch.setattr(neural_memory, 'project', project)
    memory = NeuralMemory(8, chunk_size=4, max_lr=max_lr, operand_dtype=operand_dtype).eval()
    with torch.no_grad():
        memory(torch.randn(2, 10, 8))
    dtype = None if operand_dtype == 'float32' else torch.bfloat16
    assert seen == [(dtype, exact)]


def test_plan_is_decided_once_from_the_settings_and_the_call():
    memory = NeuralMemory(8, chunk_size=4, max_lr=1e-3, operand_dtype='bfloat16',
                          implementation='torch', working_set_mib=1, recompute=True).eval()
    memory.working_set_bytes = lambda n, e=4, plan=None: 2**20  # one image per MiB
    x = torch.randn(3, 16, 8)
    with torch.no_grad():
        plan = memory.plan(x)
    assert plan.operand_dtype == torch.bfloat16
    assert plan.decomposed_read  # max_lr < 0.5: the projections' queries exact
    assert (plan.implementation, plan.reason) == ('torch', "implementation='torch'")
    assert plan.images_per_slice == 1 and plan.projections == 'torch'
    assert not plan.recompute and not plan.shape_generic
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.recompute = True
    memory.train()
    plan = memory.plan(x)  # autograd on: recomputed, never sliced
    assert plan.recompute and plan.images_per_slice == 3
    handle = memory.to_keys.register_forward_hook(lambda *args: None)
    assert memory.plan(x).projections == 'layers'  # the hook must see its layer called
    handle.remove()
    assert memory.plan(x).projections == 'torch'


def test_a_sharded_parameter_keeps_the_projections_as_layers(tmp_path):
    """A DTensor parameter (FSDP2's shards), even in a nested layer, leaves
    the projections to the layers: their weights cannot be folded directly."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh
    memory = NeuralMemory(8, chunk_size=4, implementation='torch').eval()
    x = torch.randn(1, 16, 8)
    assert memory.plan(x).projections == 'torch'
    dist.init_process_group('gloo', store=dist.FileStore(str(tmp_path / 'store'), 1),
                            rank=0, world_size=1)
    try:
        mesh = init_device_mesh('cpu', (1, ))
        weight = memory.pool.to_logits.weight  # AttentionPool's own layer
        memory.pool.to_logits.weight = torch.nn.Parameter(
            distribute_tensor(weight.detach(), mesh, [Replicate()]))
        assert memory.plan(x).projections == 'layers'
        assert not plain_layers((memory.pool, AttentionPool))  # found through its child
    finally:
        dist.destroy_process_group()


def test_auto_keeps_the_pytorch_path_under_compile(monkeypatch):
    """'auto' leaves the kernels to 'triton' inside torch.compile (unmeasured
    there against Inductor's fusion of the PyTorch path)."""
    memory = NeuralMemory(8, chunk_size=4).eval()
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 8, 8))
    assert plan.implementation == 'torch' and 'torch.compile' in plan.reason


def _relative_errors(ours, theirs):
    """Each tensor's error relative to its norm; for a gradient that is zero
    up to rounding (the pool's bias: a softmax ignores a shift; the closed
    form makes it exactly 0), relative to 1e-3 of the largest norm instead."""
    floor = 1e-3 * worst(b.norm() for b in theirs)
    return [((a - b).norm() / max(b.norm().item(), floor)).item() for a, b in zip(ours, theirs)]


def _outputs_and_grads(module, x, forward):
    """``forward()``'s output and the gradients of x and every parameter from
    a fixed random output gradient."""
    out = forward()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    params = [x] + [p for p in module.parameters() if p.requires_grad]
    return [out] + list(torch.autograd.grad((out * probe).sum(), params, allow_unused=True,
                                            materialize_grads=True))


# (update, tokens, settings): chunk 5 and 2 heads; parallel over several
# chunks, sequential, one chunk (every token reads W_0), recompute, the
# decomposed read (its plan at a small max_lr, with exact products: 16-bit
# operands round each backward differently, tests/test_models/test_memory_ops bound that)
BACKWARD_CASES = [('parallel', 23, {}), ('sequential', 23, {}), ('parallel', 4, {}),
                  ('parallel', 23, dict(recompute=True)),
                  ('parallel', 20, dict(operand_dtype='bfloat16', max_lr=1e-3))]


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize('update,tokens,settings', BACKWARD_CASES)
def test_closed_form_backward_equals_autograd(update, tokens, settings, dtype, tol):
    memory = _perturbed_memory(12, seed=tokens, chunk_size=5, heads=2, update=update,
                               backward='closed_form', **settings).to(dtype).train()
    x = torch.randn(2, tokens, 12, dtype=dtype, requires_grad=True)
    plan = dataclasses.replace(memory.plan(x), operand_dtype=None)
    assert plan.backward == 'closed_form'
    assert plan.decomposed_read == ('max_lr' in settings)
    ours = _outputs_and_grads(memory, x, lambda: memory.execute(x, plan))
    theirs = _outputs_and_grads(memory, x, lambda: memory.execute(
        x, dataclasses.replace(plan, backward='autograd')))
    assert worst(_relative_errors(ours, theirs)) < tol


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_closed_form_backward_equals_autograd_in_a_backbone(dtype, tol):
    from convneur_mm.models.backbones.convneur import ConvNeur
    torch.manual_seed(0)
    model = ConvNeur(arch='m1', memory_cfg=dict(chunk_size=16)).to(dtype).train()
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    assert memories
    x = torch.randn(1, 3, 64, 64, dtype=dtype, requires_grad=True)

    def run(backward):
        for m in memories:
            m.backward = backward
        return _outputs_and_grads(model, x, lambda: model(x)[-1])

    ours, theirs = run('closed_form'), run('autograd')
    assert worst(_relative_errors(ours, theirs)) < tol


def test_plan_backward():
    memory = NeuralMemory(8, chunk_size=4).train()
    x = torch.randn(1, 12, 8)
    assert memory.plan(x).backward == 'closed_form'  # the default
    with torch.no_grad():  # nothing to differentiate: the plain forward
        assert memory.plan(x).backward == 'autograd'
    memory.backward = 'autograd'
    assert memory.plan(x).backward == 'autograd'
    with pytest.raises(ValueError, match='backward'):
        NeuralMemory(8, backward='manual')


@pytest.mark.parametrize('backward', ['closed_form', 'autograd'])
def test_second_order_gradients_are_refused_where_the_memory_writes(backward):
    """The memory differentiates to first order: through a write,
    ``create_graph=True`` (a gradient penalty) is an error on either backward,
    not a wrong answer (autograd's would be off: PyTorch's LayerNorm, in the
    write's gradient, has wrong third derivatives). First-order gradients and a
    plain training step are unchanged."""
    memory = _perturbed_memory(8, seed=0, chunk_size=4, backward=backward).train()
    x = torch.randn(1, 12, 8, dtype=torch.float64, requires_grad=True)
    (grad, ) = torch.autograd.grad(memory(x).square().sum(), x)
    assert grad.shape == x.shape
    with pytest.raises(RuntimeError, match='first order only'):
        torch.autograd.grad(memory(x).square().sum(), x, create_graph=True)


def test_second_order_gradients_are_exact_where_the_memory_only_reads():
    """One chunk writes nothing: autograd's backward differentiates twice,
    exactly (a gradient penalty against finite differences)."""
    memory = _perturbed_memory(8, seed=0, chunk_size=12, backward='autograd').train()
    x = torch.randn(1, 12, 8, dtype=torch.float64, requires_grad=True)

    def penalty(inputs):
        (g, ) = torch.autograd.grad(memory(inputs).square().sum(), inputs, create_graph=True)
        return g.square().sum()

    assert torch.autograd.gradcheck(penalty, (x, ))


@pytest.mark.parametrize('transform', ['vmap', 'grad'])
def test_torch_func_transforms_get_a_clear_error(transform):
    """Neither path has batching rules, and the backward is of first order
    only (``torch.func.grad`` differentiates twice): a clear error instead of
    torch's about autograd.Function internals; ``functional_call`` alone runs."""
    memory = NeuralMemory(16, chunk_size=8).eval()
    x = torch.randn(3, 1, 20, 16)
    params = dict(memory.named_parameters())
    calls = {'vmap': lambda: torch.func.vmap(memory)(x),
             'grad': lambda: torch.func.grad(
                 lambda p: torch.func.functional_call(memory, p, (x[0], )).sum())(params)}
    with pytest.raises(RuntimeError, match='does not run under torch.func transforms'):
        calls[transform]()
    out = torch.func.functional_call(memory, params, (x[0], ))
    torch.testing.assert_close(out, memory(x[0]))
