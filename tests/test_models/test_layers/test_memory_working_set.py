"""The memory's bounded working set: early frees, image slices, recomputation."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convneur_mm.models.layers.memory_ops import MemoryWeights, memory_grads
from convneur_mm.models.layers.neural_memory import NeuralMemory
from .test_neural_memory import CASES, _perturbed_memory


class _LargestLive(TorchDispatchMode):
    """The most tensors of at least ``numel`` elements (distinct storages)
    alive at once among those the ops inside create."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.most = numel, 0
        self._live = {}  # id -> weak reference (tensors compare elementwise)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self._live[id(t)] = weakref.ref(t)
        alive = [ref() for ref in self._live.values()]
        self.most = max(self.most, len({t.untyped_storage().data_ptr()
                                        for t in alive if t is not None}))
        return out


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
        want = memory_grads(w, keys, values, lr)
        with _LargestLive(wide) as live:
            got = memory_grads(w, keys, values, lr)
    assert live.most <= 2
    for g, v in zip(got, want):
        torch.testing.assert_close(g, v, rtol=0, atol=0)
    # with autograd the same function is differentiable (and keeps what it needs)
    leaf = w.map(lambda t: t.clone().requires_grad_())
    grads = memory_grads(leaf, keys, values, lr)
    sum(g.sum() for g in grads).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaf)


@pytest.mark.parametrize('slices', [1, 3])
@pytest.mark.parametrize('update', ['parallel', 'sequential'])
@pytest.mark.parametrize('chunk,tokens,heads,scan_block', CASES)
def test_image_slices_give_the_unsliced_result(chunk, tokens, heads, scan_block, update,
                                               slices, monkeypatch):
    """Exact in float64 (to 1e-12); in float32 within 1e-6 of the outputs'
    scale or, where larger, float32's own error against float64 (the
    products' summation order may change with the batch: at 13 chained
    chunks the outputs reach 5.7 and differ by a few float32 ulps, while
    float32 itself is 1e-5 from float64)."""
    torch.manual_seed(chunk * 100 + tokens)
    memory = NeuralMemory(12, chunk_size=chunk, heads=heads, update=update,
                          scan_block=scan_block, max_lr=0.7).double()
    with torch.no_grad():
        for p in memory.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, tokens, 12, dtype=torch.float64)
    # one image's working set is a MiB here: the budget fits ``slices`` images
    monkeypatch.setattr(NeuralMemory, 'working_set_bytes', lambda self, n, e=4: 2**20)
    results = {}
    for dtype in (torch.float64, torch.float32):
        memory, x = memory.to(dtype), x.to(dtype)
        with torch.no_grad():
            memory.working_set_mib = None
            whole = memory(x)
            memory.working_set_mib = slices
            assert memory._image_slices(x) == slices
            results[dtype] = whole, memory(x)
    whole64, sliced64 = results[torch.float64]
    torch.testing.assert_close(sliced64, whole64, rtol=0, atol=1e-12)
    whole32, sliced32 = results[torch.float32]
    float32_error = (whole32.double() - whole64).abs().max().item()
    bound = max(1e-6 * max(1.0, whole64.abs().max().item()), float32_error)
    torch.testing.assert_close(sliced32, whole32, rtol=0, atol=bound)


def test_slices_only_in_eager_inference():
    memory = NeuralMemory(8, chunk_size=4, working_set_mib=1)
    x = torch.randn(3, 16, 8)
    memory.working_set_bytes = lambda n, e=4: 2**20
    with torch.no_grad():
        assert memory._image_slices(x) == 1
    assert memory._image_slices(x) == 3  # autograd on: one pass
    # the budget estimate grows with the written tokens
    assert memory.working_set_bytes(64) < NeuralMemory(8, chunk_size=4).working_set_bytes(640)


def _saved_bytes(fn):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize('update', ['parallel', 'sequential'])
def test_recompute_saves_only_the_input_and_trains_the_same(update):
    plain = _perturbed_memory(12, seed=4, chunk_size=5, heads=2, update=update).train()
    again = _perturbed_memory(12, seed=4, chunk_size=5, heads=2, update=update,
                              recompute=True).train()
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
    cfg = dict(matmul_dtype='bfloat16', kernels='torch', working_set_mib=64, recompute=True)
    model = ConvNeur(arch=dict(depths=[1, 1], dims=[8, 16], memory_dim=8), memory_cfg=cfg)
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    assert memories
    for memory in memories:
        assert {k: getattr(memory, k) for k in cfg} == cfg
    with pytest.raises(ValueError, match='matmul_dtype'):
        ConvNeur(arch=dict(depths=[1], dims=[8], memory_dim=8),
                 memory_cfg=dict(matmul_dtype='half'))
