"""What every global-branch type and every fusion computes (Table 5), against
the naive references of mixer_reference.py, plus their settings' errors.

Each comparison runs in float64 on a small odd-sized map with every
parameter drawn at random (zero inits such as Non-local's output conv or
Titans' persistent tokens would otherwise hide whole terms), with sizes that
exercise the corner cases: several memory chunks, a last partial attention
segment, a token shift at every border. test_wkv.py checks the WKV itself.

Mutants checked by hand (each applied alone; each fails the tests named):

=====================================================  ==============================================
mutant                                                 caught by
=====================================================  ==============================================
'add' computed as a sigmoid gate                       the 'add' fusion test (memory and attention)
'concat' as a gate plus ``0 * fuse([G, F_loc])``       the 'concat' fusion test
'gate' without its sigmoid (G * F_loc)                 the 'gate' fusion test
CBAM channel gate from the average pool only           CBAM branch test
CBAM spatial statistics swapped (mean, max)            CBAM branch test
Non-local softmax over the query axis                  Non-local branch test
Non-local without its residual                         Non-local branch test
WKV forward direction only                             WKV definition and recurrence tests, IR-RWKV
WKV without the current-token bonus e^u                WKV definition and recurrence tests, IR-RWKV
IR-RWKV without the sigmoid(r) gate                    IR-RWKV branch test
IR-RWKV without its depthwise-conv step                IR-RWKV branch test
Titans' last partial segment attends to padding        Titans branch test
Titans without the memory's residual                   Titans branch test
Titans' persistent keys zeroed                         Titans branch test
attention without the 1/sqrt(d) scale                  attention branch test, the three fusion tests
=====================================================  ==============================================
"""
import pytest
import torch

from convneur_mm.models.layers.block import ConvNeurBlock
from convneur_mm.models.layers.global_branch import GlobalBranch
from convneur_mm.models.layers.mixers import MIXERS, resolve_mixer_cfg
from ... import mixer_reference as ref
from ...devices import DEVICES

MEMORY = dict(chunk_size=8, max_lr=1.0, update='parallel', heads=2)
# small settings whose structure is the default one: two attention heads, a
# 3-persistent-token Titans with 8-token segments (35 tokens: a partial one)
SMALL = dict(attention=dict(heads=2), cbam=dict(reduction=4),
             titans=dict(heads=2, head_dim=4, persistent_tokens=3))


def _small_cfg(mixer):
    return SMALL.get(mixer)


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module


@pytest.mark.parametrize('mixer', list(MIXERS))
def test_global_branch_computes_its_mixer(mixer):
    """G = proj_out(mixer(proj_in(x))) against the mixer's naive reference."""
    torch.manual_seed(0)
    branch = GlobalBranch(6, 8, mixer, _small_cfg(mixer), **MEMORY).double()
    _randomize(branch)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    expected = ref.global_branch(branch, x)  # the memory's reference takes autograd steps
    out = branch(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('fusion', ['gate', 'add', 'concat'])
@pytest.mark.parametrize('mixer', ['memory', 'attention'])
def test_block_fuses_global_and_local_maps_as_defined(mixer, fusion):
    """X + fuse(G, F_loc): sigmoid(G) F_loc, G + F_loc or Conv1x1([G, F_loc]).

    Catches fusions that compute another one (e.g. 'add' as a gate, or
    'concat' as a gate plus 0 * fuse(...)), which shape checks cannot."""
    torch.manual_seed(0)
    block = ConvNeurBlock(6, memory_cfg=dict(MEMORY, dim=8), fusion=fusion,
                          global_mixer=mixer).double()
    _randomize(block)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    local, glob = block.local_branch(x), ref.global_branch(block.global_branch, x)
    expected = x + ref.fused(fusion, glob, local, getattr(block, 'fuse', None))
    out = block(x)
    assert glob.abs().mean() > 0.1 and local.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('mixer', list(MIXERS))
def test_mixer_parameters_live_under_its_own_name(mixer):
    """State-dict keys: proj_in, proj_out and the mixer's attribute only
    ('memory' and 'attention' as before mixer_cfg existed)."""
    branch = GlobalBranch(6, 8, mixer, _small_cfg(mixer), **MEMORY)
    prefixes = {key.split('.')[0] for key in branch.state_dict()}
    assert prefixes == {'proj_in', 'proj_out', MIXERS[mixer].attribute}


def test_attention_heads_default_to_the_memory_setting():
    assert GlobalBranch(6, 8, 'attention', heads=4).attention.heads == 4
    assert GlobalBranch(6, 8, 'attention', dict(heads=2), heads=4).attention.heads == 2


def test_titans_segments_default_to_the_memory_chunk():
    branch = GlobalBranch(6, 8, 'titans', dict(heads=2, head_dim=4), chunk_size=5)
    assert branch.titans.attention.segment_len == 5 == branch.titans.memory.chunk_size


@pytest.mark.parametrize('mixer,cfg,match', [
    ('titans', dict(heads=2, head_dim=4, segment_len=0), 'needs segment_len'),
    ('attention', dict(heads=0), 'heads must be an int >= 1, got 0'),
])
def test_a_zero_is_refused_not_taken_for_the_default(mixer, cfg, match):
    with pytest.raises(ValueError, match=match):
        GlobalBranch(6, 8, mixer, cfg, heads=4, chunk_size=5)


@pytest.mark.parametrize('mixer,cfg,match', [
    ('cbam', dict(ratio=4), r"unknown mixer_cfg keys \['ratio'\] for global_mixer='cbam'; "
                            r"valid keys are \['reduction', 'kernel_size'\]"),
    ('memory', dict(heads=2), 'it takes none .its settings are in memory_cfg'),
    ('lstm', None, 'global_mixer must be one of'),
])
def test_bad_mixer_settings_give_clear_errors(mixer, cfg, match):
    with pytest.raises(ValueError, match=match):
        resolve_mixer_cfg(mixer, cfg)


@pytest.mark.parametrize('mixer,cfg,match', [
    ('cbam', dict(kernel_size=4), 'kernel_size must be odd'),
    ('nonlocal', dict(reduction=0), 'reduction must be >= 1'),
    ('rwkv', dict(shift_gamma=0.5), 'shift_gamma'),
    ('titans', dict(persistent_tokens=-1), 'persistent_tokens >= 0'),
])
def test_bad_mixer_values_give_clear_errors(mixer, cfg, match):
    with pytest.raises(ValueError, match=match):
        GlobalBranch(6, 8, mixer, cfg, **MEMORY)


def test_non_local_affinities_stay_finite_under_fp16_autocast():
    """Affinities of 72900 unscaled (above fp16's 65504), 36450 once scaled by
    1/sqrt(d'): scaling theta before the product keeps fp16 autocast finite
    where scaling the product after it gives inf, then a NaN softmax."""
    from convneur_mm.models.layers.mixers.non_local import NonLocal2d
    block = NonLocal2d(8, reduction=2)  # d' = 4, scale 1/2
    with torch.no_grad():
        for conv in (block.theta, block.phi, block.g):
            conv.weight.zero_()
            conv.bias.fill_(135.0)
        block.conv_out.weight.fill_(1e-3)
    x = torch.randn(1, 8, 4, 4)
    with torch.autocast('cpu', dtype=torch.float16):
        out = block(x)
    assert torch.isfinite(out).all()


def test_segmented_attention_does_not_pad_a_map_shorter_than_a_segment(monkeypatch):
    """49 tokens under a 4096-token segment (a dense config's last stage) are
    one segment of 49: the same output as a 49-token segment, and no
    4096 x 4096 attention (which made Titans' small stages cost ~1.5 s at
    224x224 on a CPU)."""
    import torch.nn.functional as F
    from convneur_mm.models.layers.mixers.titans import SegmentedAttention
    torch.manual_seed(0)
    long = SegmentedAttention(16, segment_len=4096, heads=2, head_dim=8, persistent_tokens=4)
    exact = SegmentedAttention(16, segment_len=49, heads=2, head_dim=8, persistent_tokens=4)
    for p in long.parameters():
        torch.nn.init.normal_(p, std=0.2)
    exact.load_state_dict(long.state_dict())
    lengths = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention',
                        lambda q, *a, **k: lengths.append(q.shape[-2]) or sdpa(q, *a, **k))
    x = torch.randn(2, 49, 16)
    torch.testing.assert_close(long(x), exact(x))
    assert lengths == [49, 49]


@pytest.mark.torch_pinned
def test_deterministic_mode_allows_cuda_only_the_math_attention_kernel():
    """CUDA's fused attention backward kernels stay non-deterministic under
    ``warn_only`` (what ``--deterministic`` sets); the math one is not."""
    from convneur_mm.models.layers.mixers.attention import deterministic_kernel
    fused = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
             torch.backends.cuda.cudnn_sdp_enabled)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with deterministic_kernel('cuda'):
            assert not any(f() for f in fused) and torch.backends.cuda.math_sdp_enabled()
        with deterministic_kernel('cpu'):  # the CPU's flash kernel is deterministic
            assert all(f() for f in fused)
        with torch.no_grad(), deterministic_kernel('cuda'):  # forward kernels are
            assert all(f() for f in fused)
        torch.use_deterministic_algorithms(True)  # raising: they pick their deterministic variant
        with deterministic_kernel('cuda'):
            assert all(f() for f in fused)
    finally:
        torch.use_deterministic_algorithms(False)
    with deterministic_kernel('cuda'):  # not asked for: the fast kernels
        assert all(f() for f in fused)


@pytest.mark.torch_pinned
def test_deterministic_kernel_compiles_without_a_graph_break():
    """Under ``--compile --deterministic`` on CUDA the kernel choice is traced:
    Dynamo cannot call ``is_deterministic_algorithms_warn_only_enabled`` and
    broke the graph at every attention call. The device is passed as a
    string, so the CUDA branch runs here on CPU tensors."""
    import torch.nn.functional as F

    from convneur_mm.models.layers.mixers.attention import deterministic_kernel

    def attend(q):
        with deterministic_kernel('cuda'):
            return F.scaled_dot_product_attention(q, q, q)

    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    q = torch.randn(2, 1, 16, 8, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend=record, fullgraph=True)
    try:
        for warn_only in (True, False, True):  # a changed flag recompiles, no stale choice
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
            torch.testing.assert_close(compiled(q), attend(q))
        assert len(graphs) == 2  # the third call reuses the first graph
        assert 'sdpa_kernel' in graphs[0] and 'sdpa_kernel' not in graphs[1], graphs
    finally:
        torch.use_deterministic_algorithms(False)
        torch._dynamo.reset()


@pytest.mark.parametrize('mixer', ['attention', 'titans'])
@pytest.mark.parametrize('device', DEVICES)
def test_attention_mixers_repeat_exactly_in_deterministic_mode(mixer, monkeypatch, device):
    """Two backward passes in deterministic mode give identical gradients,
    through the kernels ``deterministic_kernel`` allows on the device."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    branch = _randomize(GlobalBranch(6, 8, mixer, _small_cfg(mixer), **MEMORY)).to(device)
    x = torch.randn(2, 6, 9, 11, device=device)  # 99 tokens: Titans pads a segment
    kernels = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: kernels.append(
        torch.backends.cuda.flash_sdp_enabled()) or sdpa(*a, **k))
    grads = []
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        for _ in range(2):
            branch.zero_grad()
            branch(x).square().sum().backward()
            grads.append([p.grad.clone() for p in branch.parameters() if p.grad is not None])
    finally:
        torch.use_deterministic_algorithms(False)
    assert kernels and all(flash == (device != 'cuda') for flash in kernels)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
