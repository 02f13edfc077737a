"""The memory's working set: image slices in inference, recompute in
training, and the estimate that bounds what inference holds."""
import dataclasses

import pytest
import torch

from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_torch, kernels
from convneur_mm.models.layers.neural_memory import NeuralMemory
from convneur_mm.testing.dispatch_probes import LiveTensorBytes

from ..test_layers.test_neural_memory import CASES, _perturbed_memory


def _grads_inputs(groups=2, chunks=3, length=16, d=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    w = MemoryWeights(torch.randn(groups, d, 4 * d, generator=gen, dtype=dtype) * 0.3,
                      torch.randn(groups, 4 * d, d, generator=gen, dtype=dtype) * 0.3,
                      torch.randn(groups, d, generator=gen, dtype=dtype) * 0.1)
    keys = torch.randn(groups, chunks, length, d, generator=gen, dtype=dtype)
    values = torch.randn(groups, chunks, length, d, generator=gen, dtype=dtype)
    lr = torch.rand(groups, chunks, length, generator=gen, dtype=dtype)
    return w, keys, values, lr


def test_inference_write_holds_at_most_two_wide_tensors():
    """Of pre, act, the product before GELU's derivative and d_pre (each
    (G, C*L, 4d)) at most two are alive at once without autograd."""
    w, keys, values, lr = _grads_inputs()
    wide = keys.shape[0] * keys.shape[1] * keys.shape[2] * 4 * keys.shape[3]
    with torch.no_grad():
        want = chunk_grads_torch(w, keys, values, lr)
        with LiveTensorBytes(min_bytes=wide * keys.element_size()) as live:
            got = chunk_grads_torch(w, keys, values, lr)
    assert live.most_storages == 2
    for g, v in zip(got, want):
        torch.testing.assert_close(g, v, rtol=0, atol=0)
    # with autograd the same function is differentiable (and keeps what it needs)
    leaf = w.map(lambda t: t.clone().requires_grad_())
    grads = chunk_grads_torch(leaf, keys, values, lr)
    sum(g.sum() for g in grads).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaf)


@pytest.mark.parametrize('slices', [1, 3])
@pytest.mark.parametrize('update', ['parallel', 'sequential'])
@pytest.mark.parametrize('chunk,tokens,heads,scan_block', CASES)
def test_image_slices_give_the_unsliced_result(chunk, tokens, heads, scan_block, update,
                                               slices, monkeypatch):
    """Exact in float64 (to 1e-12). In float32 the products' summation order
    changes with the batch, so the sliced result is another float32 rounding
    of the same exact one: both are held to float64 within 1e-5 of the
    outputs' scale (or 4x the unsliced error, where larger). At 13 chained
    chunks the unsliced results measured up to 1e-6 of it, the sliced up to 3e-6."""
    torch.manual_seed(chunk * 100 + tokens)
    memory = NeuralMemory(12, chunk_size=chunk, heads=heads, update=update,
                          scan_block=scan_block, max_lr=0.7).double()
    with torch.no_grad():
        for p in memory.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, tokens, 12, dtype=torch.float64)
    # one image's working set is a MiB here: the budget fits ``slices`` images
    monkeypatch.setattr(NeuralMemory, 'working_set_bytes', lambda self, n, e=4, plan=None: 2**20)
    results = {}
    for dtype in (torch.float64, torch.float32):
        memory, x = memory.to(dtype), x.to(dtype)
        with torch.no_grad():
            memory.working_set_mib = None
            whole = memory(x)
            memory.working_set_mib = slices
            assert memory.plan(x).images_per_slice == slices
            results[dtype] = whole, memory(x)
    whole64, sliced64 = results[torch.float64]
    torch.testing.assert_close(sliced64, whole64, rtol=0, atol=1e-12)
    whole32, sliced32 = results[torch.float32]
    assert torch.isfinite(whole32).all()  # its error bounds the sliced one's
    float32_error = (whole32.double() - whole64).abs().max().item()
    bound = max(1e-5 * max(1.0, whole64.abs().max().item()), 4 * float32_error)
    torch.testing.assert_close(sliced32.double(), whole64, rtol=0, atol=bound)


@pytest.mark.parametrize('update', ['parallel', 'sequential'])
@pytest.mark.parametrize('max_lr', [0.7, 1e-3])  # 1e-3: the decomposed read
def test_image_slices_keep_16_bit_operands(max_lr, update, monkeypatch):
    """bfloat16 operands, emulated in float64 (exact to the summation order):
    each slice computes with them, so sliced equals unsliced, and both
    differ from the exact products by more than the comparison's bound."""
    memory = _perturbed_memory(12, seed=5, chunk_size=5, heads=2, update=update,
                               max_lr=max_lr, operand_dtype='bfloat16')
    x = torch.randn(4, 23, 12, dtype=torch.float64)
    monkeypatch.setattr(NeuralMemory, 'working_set_bytes', lambda self, n, e=4, plan=None: 2**20)
    with torch.no_grad():
        whole = memory(x)
        exact = memory.execute(x, dataclasses.replace(
            memory.plan(x), operand_dtype=None, decomposed_read=False))
        memory.working_set_mib = 1
        plan = memory.plan(x)
        assert plan.images_per_slice == 1 and plan.operand_dtype == torch.bfloat16
        sliced = memory(x)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-12)
    assert (whole - exact).abs().max() > 1e-8


def test_slices_only_in_eager_inference():
    memory = NeuralMemory(8, chunk_size=4, working_set_mib=1)
    x = torch.randn(3, 16, 8)
    memory.working_set_bytes = lambda n, e=4, plan=None: 2**20
    with torch.no_grad():
        assert memory.plan(x).images_per_slice == 1
    assert memory.plan(x).images_per_slice == 3  # autograd on: one pass
    # the budget estimate grows with the written tokens
    fresh = NeuralMemory(8, chunk_size=4)
    assert fresh.working_set_bytes(64) < fresh.working_set_bytes(640)


def _saved_bytes(fn):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize('operand_dtype', ['auto', 'bfloat16'])
@pytest.mark.parametrize('update', ['parallel', 'sequential'])
def test_recompute_saves_only_the_input_and_trains_the_same(update, operand_dtype):
    """Also with bfloat16 operands (emulated in float64): the recomputed
    forward keeps them, where float32 ones would change every gradient."""
    cfg = dict(chunk_size=5, heads=2, update=update, operand_dtype=operand_dtype)
    plain = _perturbed_memory(12, seed=4, **cfg).train()
    again = _perturbed_memory(12, seed=4, recompute=True, **cfg).train()
    x = torch.randn(2, 23, 12, dtype=torch.float64, requires_grad=True)
    out, plain_bytes = _saved_bytes(lambda: plain(x))
    out_r, recompute_bytes = _saved_bytes(lambda: again(x))
    assert recompute_bytes <= x.numel() * x.element_size()
    assert recompute_bytes < plain_bytes / 10
    torch.testing.assert_close(out_r, out, rtol=0, atol=0)
    probe = torch.randn_like(out)
    want = torch.autograd.grad((out * probe).sum(), [x, *plain.parameters()])
    got = torch.autograd.grad((out_r * probe).sum(), [x, *again.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_backbone_memory_cfg_reaches_every_memory():
    from convneur_mm.models import ConvNeur
    cfg = dict(operand_dtype='bfloat16', implementation='torch', working_set_mib=64, recompute=True)
    model = ConvNeur(arch=dict(depths=[1, 1], dims=[8, 16], memory_dim=8), memory_cfg=cfg)
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    assert memories
    for memory in memories:
        assert {k: getattr(memory, k) for k in cfg} == cfg
    with pytest.raises(ValueError, match='operand_dtype'):
        ConvNeur(arch=dict(depths=[1], dims=[8], memory_dim=8),
                 memory_cfg=dict(operand_dtype='half'))


def test_live_tensor_bytes_follows_storages_not_tensors():
    outside = torch.ones(10)
    with LiveTensorBytes() as live:
        a = torch.empty(100)  # 400 bytes
        view = a.view(10, 10)  # the same storage
        del a  # the view keeps it
        b = torch.empty(50)  # 200 more: 600 at once
        outside.view(2, 5).add_(1)  # made before the context: nothing
        del view  # the 400 go
        b.mul_(2)  # in place: nothing new
        c = outside + 1  # 40
    assert (live.peak, live.live, live.most_storages) == (600, 240, 2)
    del b, c


def _held_per_image(memory: NeuralMemory, num_tokens: int, batches=(2, 4)) -> float:
    """Bytes that inference holds at most per image: the growth from batch 2
    to 4 (``batches``) over the images added, so that per-call constants
    (folded weights) cancel."""
    peaks = []
    for batch in batches:
        x = torch.randn(batch, num_tokens, memory.dim, device='meta')
        with torch.no_grad(), LiveTensorBytes() as live:
            memory(x)
        peaks.append(live.peak)
    return (peaks[1] - peaks[0]) / (batches[1] - batches[0])


@pytest.mark.parametrize('dim,heads,chunk,tokens,update,operand_dtype', [
    (128, 1, 196, 3136, 'parallel', 'float32'),  # M3's first stage
    (128, 1, 196, 784, 'parallel', 'float32'),
    (64, 2, 16, 3136, 'parallel', 'float32'),  # several scan blocks
    (64, 1, 49, 200, 'parallel', 'bfloat16'),  # 16-bit operand copies
    (128, 2, 16, 1000, 'parallel', 'bfloat16'),
    (128, 1, 49, 1000, 'sequential', 'float32'),
    (128, 1, 196, 200, 'sequential', 'float32'),
    (64, 1, 49, 40, 'parallel', 'float32'),  # one chunk: W_0 only
])
def test_working_set_estimate_bounds_what_inference_holds(dim, heads, chunk, tokens, update,
                                                          operand_dtype):
    """The slices' estimate is at least what one image's inference holds at
    once (a budget is kept) and at most 1.6x (slices are not needlessly
    small); on tensors without data, so M3's sizes take no time."""
    memory = NeuralMemory(dim, chunk_size=chunk, heads=heads, update=update,
                          operand_dtype=operand_dtype).eval().to('meta')
    held = _held_per_image(memory, tokens)
    estimate = memory.working_set_bytes(tokens)
    assert held <= estimate <= 1.6 * held, (estimate, held)


@pytest.mark.parametrize('dim,heads,chunk,tokens,operand_dtype,max_lr', [
    (128, 1, 196, 3136, 'bfloat16', 1.0),  # M3's first stage
    (160, 1, 196, 3136, 'bfloat16', 1.0),  # M4's
    (64, 2, 16, 3136, 'float32', 1.0),  # float32 keys stay for the weights' pass
    (128, 2, 16, 1000, 'float16', 1e-3),  # float32 gradients: float16, a decomposed read
    (64, 1, 49, 40, 'bfloat16', 1.0),  # one chunk: W_0 only
])
def test_working_set_estimate_prices_the_kernels_path(dim, heads, chunk, tokens, operand_dtype,
                                                      max_lr):
    """Through every kernel the estimate is at least what one image's
    inference holds and at most 1.2x (the PyTorch path's estimate, up to 4
    times that at M3's first stage, would slice needlessly small), and
    ``working_set_mib`` slices by it."""
    memory = NeuralMemory(dim, chunk_size=chunk, heads=heads, operand_dtype=operand_dtype,
                          max_lr=max_lr, implementation='triton').eval().to('meta')
    x = torch.empty(64, tokens, dim, device='meta')
    with kernels.without_launches():
        held = _held_per_image(memory, tokens, batches=(4, 8))
        with torch.no_grad():
            plan = memory.plan(x)
            estimate = memory.working_set_bytes(tokens, plan=plan)
            memory.working_set_mib = 16
            sliced = memory.plan(x).images_per_slice
    assert plan.scan == plan.projections == 'triton'
    assert held <= estimate <= 1.2 * held, (estimate, held)
    assert sliced == max(1, min(64, 16 * 2**20 // estimate))
    assert memory.working_set_bytes(tokens) > estimate  # the PyTorch path's
