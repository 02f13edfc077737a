"""ConvNeur backbone: API, shapes, training behaviour and bad input."""
import pytest
import torch

from convneur_mm.models import ConvNeur
from convneur_mm.analysis.memory_fit import SavedTensorMeter
from convneur_mm.testing.errors import worst
from ...devices import DEVICES
from .learning import dead_parameters

TINY = dict(depths=[1, 2, 1, 1], dims=[8, 16, 24, 32], memory_dim=8)


def _tiny(**kwargs):
    kwargs.setdefault('arch', TINY)
    kwargs.setdefault('memory_cfg', dict(chunk_size=16))
    torch.manual_seed(0)
    model = ConvNeur(**kwargs)
    model.init_weights()
    return model


@pytest.mark.parametrize('out_indices,expected', [
    ((0, 1, 2, 3), (0, 1, 2, 3)), (-1, (3, )), ([1, -1], (1, 3)), (2, (2, ))])
def test_dense_outputs_have_channels_and_strides(out_indices, expected):
    model = _tiny(out_indices=out_indices, gap_before_final_norm=False)
    outs = model(torch.randn(2, 3, 64, 96))
    assert len(outs) == len(expected)
    for out, stage in zip(outs, expected):
        stride = 4 * 2**stage
        assert out.shape == (2, TINY['dims'][stage], 64 // stride, 96 // stride)


@pytest.mark.parametrize('device', DEVICES)
def test_dense_outputs_are_contiguous_for_roi_align(device):
    """mmcv's RoIAlign reads raw NCHW memory: channels-last strides (what the
    LayerNorms produce) would feed the RoI heads scrambled features. What it
    pools from our maps must equal torchvision's stride-aware RoIAlign."""
    from mmcv.ops import roi_align
    from torchvision.ops import roi_align as strided_roi_align
    model = _tiny(out_indices=(0, 1, 2, 3), gap_before_final_norm=False).eval().to(device)
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96, device=device))
    assert all(out.is_contiguous() and out.device.type == device for out in outs)
    rois = torch.tensor([[0, 4., 8., 40., 60.], [1, 30., 2., 90., 50.]], device=device)
    pooled = roi_align(outs[0], rois, (7, 7), 0.25, 0, 'avg', True)
    reference = strided_roi_align(outs[0], rois, (7, 7), 0.25, 0, True)
    torch.testing.assert_close(pooled, reference)


def test_classification_output_is_pooled_vector():
    outs = _tiny()(torch.randn(2, 3, 64, 64))
    assert len(outs) == 1 and outs[0].shape == (2, 32)


@pytest.mark.parametrize('arch', ['m1', 'M2', 'm3', 'm4'])
def test_paper_archs_build_and_run(arch):
    model = ConvNeur(arch=arch, out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
    setting = ConvNeur.arch_settings[arch.lower()]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == setting['dims']
    memories = [m for m in model.modules() if type(m).__name__ == 'NeuralMemory']
    assert len(memories) == 4 and all(m.dim == setting['memory_dim'] for m in memories)


@pytest.mark.parametrize('size', [(97, 131), (1, 1), (33, 7), (224, 224)])
def test_any_input_size_works(size):
    model = _tiny(out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
    outs = model(torch.randn(1, 3, *size))
    for stage, out in enumerate(outs):
        stride = 4 * 2**stage
        # ceil: padding lets every pixel reach the output
        assert out.shape[-2:] == (-(-size[0] // stride), -(-size[1] // stride))
        assert torch.isfinite(out).all()


def test_features_do_not_depend_on_batch_mates():
    model = _tiny(out_indices=(0, 1, 2, 3), gap_before_final_norm=False).eval()
    x = torch.randn(3, 3, 64, 64)
    batch = model(x)
    for i in range(3):
        single = model(x[i:i + 1])
        for a, b in zip(batch, single):
            torch.testing.assert_close(a[i:i + 1], b, rtol=1e-4, atol=1e-5)


def test_frozen_stages_stop_gradients_and_stay_in_eval():
    model = _tiny(frozen_stages=2, drop_path_rate=0.1)
    model.train()
    frozen = [model.downsample_layers[i] for i in range(2)] + [model.stages[i] for i in range(2)]
    for module in frozen:
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    assert model.stages[2].training
    assert all(p.requires_grad for p in model.stages[2].parameters())


def test_with_cp_gives_identical_outputs_and_gradients():
    x = torch.randn(2, 3, 64, 64)
    results = []
    for with_cp in (False, True):
        model = _tiny(with_cp=with_cp, out_indices=(0, 1, 2, 3),
                      gap_before_final_norm=False).train()
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_with_cp_saves_fewer_activations_for_backward():
    """What autograd keeps between forward and backward: with_cp keeps only
    each block's input (measured: 11% of the activations here; 6% for M3 at
    512x512, benchmark.py --task checkpointing)."""
    x = torch.randn(2, 3, 64, 64)
    saved = {}
    for with_cp in (False, True):
        model = _tiny(with_cp=with_cp, out_indices=(0, 1, 2, 3),
                      gap_before_final_norm=False).train()
        with SavedTensorMeter(exclude=model.parameters()) as meter:
            outs = model(x)
        sum(o.square().mean() for o in outs).backward()  # recomputes the blocks
        saved[with_cp] = meter.total_bytes
        # eval and no-grad forwards do not checkpoint (nothing to save anyway)
        with torch.no_grad(), SavedTensorMeter() as meter:
            model(x)
        assert meter.total_bytes == 0
    assert 0 < saved[True] < 0.2 * saved[False], saved


def _after_step(chunk_size, update='parallel'):
    model = _tiny(memory_cfg=dict(chunk_size=chunk_size, update=update),
                  out_indices=(0, 1, 2, 3), gap_before_final_norm=False).train()
    outs = model(torch.randn(2, 3, 128, 128))
    sum(o.square().mean() for o in outs).backward()
    return model


def _grads_after_step(chunk_size, update='parallel'):
    return {n: p.grad for n, p in _after_step(chunk_size, update).named_parameters()}


@pytest.mark.parametrize('update', ['parallel', 'sequential'])
def test_every_parameter_learns_when_each_stage_has_three_chunks(update):
    # stage 4 of a 128x128 image has 4x4 = 16 tokens: chunk 5 gives 4 chunks
    assert dead_parameters(_after_step(chunk_size=5, update=update)) == []


@pytest.mark.parametrize('update', ['parallel', 'sequential'])
def test_edge_chunk_counts_give_exact_zero_not_missing_gradients(update):
    """Two chunks: one write, so the momentum S_1 = eta_1 * S_0 - G_1 with
    S_0 = 0 ignores eta_1. One chunk: nothing is written, only W_0 is read.
    Both follow from the paper's equations; the code keeps those parameters in
    the graph with exact zero gradients so DDP needs no unused-parameter search."""
    two = _grads_after_step(chunk_size=8, update=update)  # stage 4: 16 tokens
    one = _grads_after_step(chunk_size=16, update=update)
    assert all(g is not None for g in list(two.values()) + list(one.values()))
    stage4 = 'stages.3.0.global_branch.memory.'
    assert torch.count_nonzero(two[stage4 + 'to_momentum.weight']) == 0
    assert torch.count_nonzero(two[stage4 + 'to_decay.weight']) > 0
    for name in ('to_momentum.weight', 'to_decay.weight', 'to_keys.weight', 'pool.to_logits.weight'):
        assert torch.count_nonzero(one[stage4 + name]) == 0
    assert torch.count_nonzero(one[stage4 + 'to_queries.weight']) > 0


def test_chunk_and_step_size_do_not_change_the_parameter_set():
    a = _tiny(memory_cfg=dict(chunk_size=196, max_lr=1.0))
    b = _tiny(memory_cfg=dict(chunk_size=4096, max_lr=1e-3, update='sequential'))
    result = b.load_state_dict(a.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_memory_cfg_backward_reaches_every_memory():
    """``memory_cfg.backward`` picks the training backward of each memory; both
    give the same gradients (float64)."""
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    grads = {}
    for backward in ('closed_form', 'autograd'):
        torch.manual_seed(0)
        model = _tiny(memory_cfg=dict(chunk_size=16, backward=backward)).double()
        memories = [m for m in model.modules() if type(m).__name__ == 'NeuralMemory']
        assert memories and all(m.backward == backward for m in memories)
        sum(o.square().mean() for o in model(x)).backward()
        grads[backward] = torch.cat([p.grad.flatten() for p in model.parameters()
                                     if p.grad is not None])
    assert torch.allclose(grads['closed_form'], grads['autograd'], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('placement,fusion,memories', [
    ('none', 'gate', 0), ('stage', 'gate', 4), ('block', 'add', 5), ('stage', 'concat', 4)])
def test_ablation_switches(placement, fusion, memories):
    model = _tiny(memory_placement=placement, fusion=fusion)
    found = [m for m in model.modules() if type(m).__name__ == 'NeuralMemory']
    assert len(found) == memories
    assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 32)


def test_attention_mixer_replaces_the_memory():
    model = _tiny(global_mixer='attention')
    assert not [m for m in model.modules() if type(m).__name__ == 'NeuralMemory']
    assert len([m for m in model.modules() if type(m).__name__ == 'GlobalSelfAttention']) == 4
    assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 32)


def test_layer_depths_increase_through_the_network():
    model = _tiny()
    depths = [model.get_layer_depth(n)[0] for n, _ in model.named_parameters()]
    num_layers = model.get_layer_depth('stages.0.0.x')[1]
    assert num_layers == sum(TINY['depths']) + 2
    assert depths[0] == 0 and max(depths) == num_layers - 1
    assert model.get_layer_depth('stages.1.1.local_branch.dwconv.weight')[0] == 3
    assert model.get_layer_depth('head.fc.weight', prefix='backbone.')[0] == num_layers - 1


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(arch='m5'), ValueError, "Unknown ConvNeur arch 'm5'"),
    (dict(arch=dict(depths=[1], dims=[8])), ValueError, 'memory_dim'),
    (dict(arch=dict(depths=[-1, 1], dims=[8, 16], memory_dim=8)), ValueError,
     'arch depths must be ints >= 1'),
    (dict(arch=dict(depths=[1, 1], dims=[8, 0], memory_dim=8)), ValueError, 'arch dims'),
    (dict(arch=dict(depths=[1], dims=[8], memory_dim=8.0)), ValueError, 'arch memory_dim'),
    (dict(arch=dict(depths=[1], dims=[8], memory_dim=8, depth=2)), ValueError,
     "unknown keys \\['depth'\\]"),
    (dict(with_cp='no'), ValueError, 'with_cp must be a bool'),
    (dict(gap_before_final_norm='False'), ValueError, 'gap_before_final_norm must be a bool'),
    (dict(out_indices=4), ValueError, 'out_indices'),
    (dict(out_indices=(0, -4)), ValueError, 'twice'),
    (dict(out_indices=()), ValueError, 'out_indices'),
    (dict(frozen_stages=5), ValueError, 'frozen_stages'),
    (dict(frozen_stages=True), ValueError, 'frozen_stages'),  # bool is an int
    (dict(out_indices=True), ValueError, 'out_indices'),
    (dict(out_indices=[0, False]), ValueError, 'out_indices'),
    (dict(drop_path_rate=-0.1), ValueError, 'drop_path_rate'),
    (dict(memory_cfg=dict(scan_block=0)), ValueError, 'scan_block'),
    (dict(memory_cfg=dict(chunk=3)), ValueError, 'unknown memory_cfg keys'),
    (dict(memory_cfg=dict(update='fast')), ValueError, 'update'),
    (dict(memory_cfg=dict(backward='double')), ValueError, 'backward'),
    (dict(memory_placement='layer'), ValueError, 'memory_placement'),
    (dict(fusion='mul'), ValueError, 'fusion'),
    (dict(global_mixer='lstm'), ValueError, 'global_mixer must be one of'),
    (dict(global_mixer='cbam', mixer_cfg=dict(ratio=4)), ValueError, 'unknown mixer_cfg keys'),
])
def test_bad_arguments_give_clear_errors(kwargs, error, match):
    kwargs.setdefault('arch', 'm1')
    with pytest.raises(error, match=match):
        ConvNeur(**kwargs)


def test_memory_cfg_takes_the_former_key_names_with_a_warning():
    """A config written with ``matmul_dtype`` and ``kernels`` builds the same
    memories under the new names; giving a former name beside its new one
    is an error."""
    with pytest.warns(FutureWarning, match="memory_cfg: 'kernels' is deprecated; use "
                                                "'implementation'") as record:
        model = _tiny(memory_cfg=dict(chunk_size=16, matmul_dtype='bfloat16', kernels='torch'))
    assert {w.filename for w in record} == {__file__}  # the warning points at the caller
    assert model.memory_cfg['operand_dtype'] == 'bfloat16'
    assert 'matmul_dtype' not in model.memory_cfg and 'kernels' not in model.memory_cfg
    memories = [m for m in model.modules() if type(m).__name__ == 'NeuralMemory']
    assert memories and all((m.operand_dtype, m.implementation) == ('bfloat16', 'torch')
                            for m in memories)
    with pytest.raises(ValueError, match="memory_cfg got both 'kernels' and 'implementation'"):
        ConvNeur(arch='m1', memory_cfg=dict(kernels='torch', implementation='torch'))


def test_registered_in_our_scope():
    from mmengine.registry import DefaultScope

    from convneur_mm.registry import MODELS
    # whatever scope an earlier test left as the default (e.g. mmpretrain)
    with DefaultScope.overwrite_default_scope('convneur_mm'):
        model = MODELS.build(dict(type='ConvNeur', arch=TINY))
    assert isinstance(model, ConvNeur)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('device', DEVICES)
def test_stem_gradients_do_not_overflow_under_autocast(dtype, device):
    """The gradient of the stem conv's output is stage 0's times the
    LayerNorm's 1/sigma, and its weight and bias gradients sum that over
    every pixel: on the COCO detector at loss scale 1 the first came within
    1.3x of float16's 65504 and the bias gradient was ``inf`` (an H100,
    2026-11-25). So the conv runs in float32 under autocast and its output
    stays float32 (the LayerNorm after it is float32 on CUDA anyway): a
    conv-output gradient of 2e5 gives finite gradients equal to float32's."""
    model = _tiny(out_indices=(0, ), gap_before_final_norm=False).to(device)
    stem = model.downsample_layers[0]
    conv = stem[0]
    x = torch.randn(2, 3, 64, 96, device=device)
    upstream = torch.randn(2, TINY['dims'][0], 16, 24, device=device) + 1
    conv_outputs = []
    conv.register_forward_hook(lambda m, i, o: conv_outputs.append(o))

    def stem_grads(dtype=None):
        conv.zero_grad()
        conv_outputs.clear()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = stem(x)
        conv_outputs[0].retain_grad()
        (out.float() * upstream).sum().backward()
        return out.dtype, [conv_outputs[0].grad, conv.weight.grad.clone(), conv.bias.grad.clone()]

    upstream *= 2e5 / stem_grads()[1][0].abs().max()  # the conv output's gradient: 2e5
    _, want = stem_grads()
    assert want[2].abs().max() > 1e6  # the bias gradient, its sum
    got_dtype, got = stem_grads(dtype)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        # float32 both ways; cuDNN may pick other (atomic) kernels on a GPU
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    assert conv_outputs[0].dtype == got_dtype == torch.float32


@pytest.mark.parametrize('placement', ['stage', 'none'])
def test_zero_padding_is_not_a_singular_point_at_init(placement):
    """mmdet and mmseg zero-pad their batches. With a zero stem bias (the
    generic init) the padded area's features are exactly zero and every
    LayerNorm and RMSNorm after the stem multiplies the gradient there by
    1/sqrt(eps): M4's largest parameter gradient grew from 1.5 to 2e14 with
    half its input padded (this tiny one's, local-only, from 967 to 6.8e8).
    With the stem's bias drawn at random, padding changes the largest
    gradient by a small factor."""
    model = _tiny(out_indices=(0, 1, 2, 3), memory_placement=placement).train()
    assert model.downsample_layers[0][0].bias.abs().max() > 0

    def largest_gradient(padded: bool) -> float:
        torch.manual_seed(1)
        x = torch.randn(2, 3, 128, 128)
        if padded:
            x[:, :, 64:] = 0  # the pad value, after the data preprocessor's normalization
        model.zero_grad()
        outs = model(x)
        sum((o * torch.randn_like(o)).sum() for o in outs).backward()
        return worst(p.grad.abs().max() for p in model.parameters() if p.grad is not None)

    assert largest_gradient(padded=True) < 10 * largest_gradient(padded=False)


def test_a_float64_stem_stays_float64_under_autocast():
    """Autocast leaves float64 alone: so does the stem's float32 conv."""
    model = _tiny(out_indices=(0, ), gap_before_final_norm=False).double()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 32, 32, dtype=torch.float64))[0]
    assert out.dtype == torch.float64


@pytest.mark.parametrize('x', [torch.zeros(3, 32, 32), torch.zeros(1, 1, 32, 32),
                               torch.zeros(1, 3, 32, 32, dtype=torch.uint8)])
def test_images_of_another_layout_or_dtype_are_a_clear_error(x):
    with pytest.raises(ValueError, match=r'takes floating-point \(B, 3, H, W\) images, got'):
        _tiny()(x)
