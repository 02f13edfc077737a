"""The global branch under autocast: its input projection in float32."""
import pytest
import torch

from convneur_mm.models.layers.global_branch import GlobalBranch
from convneur_mm.models.layers.mixers import MIXERS
from .test_mixers import MEMORY, _small_cfg

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize('mixer', list(MIXERS))
@pytest.mark.parametrize('dtype', DTYPES, ids=['fp16', 'bf16'])
def test_input_projection_gradients_do_not_overflow_under_autocast(mixer, dtype, device='cpu'):
    """proj_in's bias gradient sums over every token the gradients that the
    memory's RMSNorms scale by 1/rms: on the COCO detector it was the largest
    float16 gradient of the network (4e3 at loss scale 1, which bounded
    dynamic loss scaling near 16). Where that sum exceeds 65504 it must stay
    finite and equal to float32's, so the projection runs in float32 and
    hands the mixer a float32 map (the memory computes in float32 anyway).
    The memory's products keep float32 operands: under CUDA bf16 autocast
    'auto' rounds them to bf16, whose own error (4% of this gradient's max at
    max_lr 1 on an H200) is not this test's subject."""
    torch.manual_seed(0)
    branch = GlobalBranch(16, 8, mixer, _small_cfg(mixer), **MEMORY,
                          operand_dtype='float32').to(device)
    x = torch.randn(2, 16, 12, 16, device=device)
    upstream = torch.randn(2, 16, 12, 16, device=device) + 1
    proj_in_dtypes = []
    branch.proj_in.register_forward_hook(lambda m, i, o: proj_in_dtypes.append(o.dtype))

    def grads(amp=None):
        branch.zero_grad()
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            out = branch(x)
        (out.float() * upstream).sum().backward()
        return [branch.proj_in.weight.grad.clone(), branch.proj_in.bias.grad.clone()]

    upstream *= 2e5 / grads()[1].abs().max()  # proj_in's bias gradient: 2e5
    want = grads()
    got = grads(dtype)
    assert proj_in_dtypes[-1] == torch.float32
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        # the mixer's and proj_out's 16-bit rounding, summed over 384 tokens
        torch.testing.assert_close(g, w, rtol=0, atol=0.02 * w.abs().max().item())


def test_a_float64_branch_stays_float64_under_autocast():
    branch = GlobalBranch(16, 8, 'memory', **MEMORY).double()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = branch(torch.randn(1, 16, 6, 6, dtype=torch.float64))
    assert out.dtype == torch.float64


def _hook_layers(module):
    """A no-op forward hook on every Conv2d, Linear and RMSNorm (as a FLOP
    counter's): the branch and the memory then call each layer."""
    return [m.register_forward_hook(lambda *a: None) for m in module.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.RMSNorm))]


@pytest.mark.parametrize('mixer', [m for m in MIXERS if MIXERS[m].tokens])
def test_channels_last_branch_equals_the_layer_by_layer_one(mixer):
    """Without hooks the token mixers' branch runs its projections as
    products on the token view (and the memory folds its norms into one
    product); with hooks each layer is called. Same outputs and gradients."""
    torch.manual_seed(0)
    branch = GlobalBranch(16, 8, mixer, _small_cfg(mixer), **MEMORY).double()
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64, requires_grad=True)
    fast = branch(x)
    handles = _hook_layers(branch)
    slow = branch(x)
    for h in handles:
        h.remove()
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    params = [x, *branch.parameters()]
    for f, s in zip(torch.autograd.grad(fast.sum(), params),
                    torch.autograd.grad(slow.sum(), params)):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-11)


def test_a_hooked_layer_is_called():
    branch = GlobalBranch(16, 8, 'memory', **MEMORY)
    calls = []
    branch.memory.to_keys.register_forward_hook(lambda *a: calls.append('to_keys'))
    branch.proj_in.register_forward_hook(lambda *a: calls.append('proj_in'))
    branch(torch.randn(1, 16, 6, 6))
    assert calls == ['proj_in', 'to_keys']


@pytest.mark.parametrize('grad', [False, True])
def test_a_writing_branch_dispatches_fewer_ops_than_layer_by_layer(grad):
    """The folded projections, the channels-last branch and the shared scan
    coefficients cut the ATen ops (kernel launches on a GPU) of one writing
    branch; the layer-by-layer path (hooks on every layer) is the reference."""
    from convneur_mm.testing.dispatch_probes import AtenOpCounter
    branch = GlobalBranch(16, 8, 'memory', **MEMORY)
    x = torch.randn(2, 16, 8, 8)  # 64 tokens, 8 chunks: 7 writes
    counts = []
    for hooked in (True, False):
        handles = _hook_layers(branch) if hooked else []
        with torch.set_grad_enabled(grad), AtenOpCounter() as counter:
            branch(x)
        for h in handles:
            h.remove()
        counts.append(counter.num_kernels)
    layer_by_layer, fused = counts
    assert fused <= layer_by_layer - 8, counts


def test_scan_of_three_tensors_shares_its_coefficients():
    from convneur_mm.models.layers.memory_ops import momentum_decay_states, scan_states
    from convneur_mm.testing.dispatch_probes import AtenOpCounter
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 7, p, generator=gen, dtype=torch.float64) for p in (6, 6, 2)]
    lr_mod = torch.rand(3, 4, 7, generator=gen, dtype=torch.float64)
    log_keep, log_momentum = (-torch.rand(4, 7, generator=gen, dtype=torch.float64)
                              for _ in range(2))
    initial = [torch.randn(4, p, generator=gen, dtype=torch.float64) for p in (6, 6, 2)]
    with AtenOpCounter() as separate:
        want = [momentum_decay_states(g, m, log_keep, log_momentum, w)
                for g, m, w in zip(grads, lr_mod, initial)]
    with AtenOpCounter() as shared:
        got = scan_states(list(grads), lr_mod, log_keep, log_momentum, initial)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert shared.num_kernels < 0.6 * separate.num_kernels
