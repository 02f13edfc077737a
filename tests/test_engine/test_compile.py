"""``--compile`` (convneur_mm.engine.compile): compiled and eager ConvNeur agree
in outputs and gradients, the backbone compiles without graph breaks, and the
tools' runners get their parts compiled without changing checkpoints."""
import os.path as osp

import pytest
import torch
from torch import nn

from convneur_mm.engine import compile as compile_mod
from convneur_mm.engine.compile import (compilable_parts, compile_model, compile_runner_model,
                                        graphs_compiled, CompilationCountHook)
from convneur_mm.apis.launch import build_runner, load_config
from convneur_mm.models import ConvNeur
from convneur_mm.models.layers.neural_memory import NeuralMemory
from convneur_mm.apis.toolbox import quiet_init
from ..devices import DEVICES, on_cuda
from ..paths import REPO

# the smallest network that still runs the memory with several chunks: one
# stage of one block; at 32x48 and chunk 16 it has 8x12 tokens in 6 chunks (5
# writes that are read). Compiling its forward and backward with Inductor
# takes most of this file's time (about a minute of CPU on the 2-core VM).
TINY = dict(depths=[1], dims=[16], memory_dim=16)
TWO_STAGES = dict(depths=[1, 1], dims=[16, 16], memory_dim=16)  # a strided downsample too


def _tiny_backbone(arch: dict = TINY, backward: str = 'autograd') -> nn.Module:
    torch.manual_seed(0)
    backbone = ConvNeur(arch=arch, memory_cfg=dict(chunk_size=16, backward=backward),
                        out_indices=tuple(range(len(arch['depths']))),
                        gap_before_final_norm=False, drop_path_rate=0.5)
    with quiet_init():
        backbone.init_weights()
    with torch.no_grad():  # off the special init values (zero gammas, gates)
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    holder = nn.Module()  # compiled as a model's .backbone part
    holder.backbone = backbone
    return holder


def _loss_and_grads(holder: nn.Module, x: torch.Tensor, amp=None):
    """Outputs and gradients of a fixed loss; ``amp``: an autocast dtype."""
    holder.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        outs = holder.backbone(x)
    sum((o.float() * torch.linspace(-1, 1, o.numel(), device=x.device).view_as(o)).sum()
        for o in outs).backward()
    return [o.detach().float() for o in outs], {n: p.grad.clone()
                                                for n, p in holder.named_parameters()}


def _dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).norm().item()


# two input sizes: training's second is a static recompile (automatic dynamic
# shapes crashed Inductor there, pytorch/pytorch#185510; that training compiles
# static shapes is asserted cheaply below). Compiling it costs about 90 s with
# empty compiler caches on 2 cores, so the fast CPU case takes the first only.
SIZES = ((2, 3, 32, 48), (1, 3, 40, 56))


# --amp's autocast dtype per device: bfloat16 on the CPU, float16 on CUDA
@pytest.mark.parametrize('device,amp,sizes', [
    pytest.param('cpu', None, SIZES[:1], id='cpu-float32'),
    pytest.param('cpu', None, SIZES, id='cpu-float32-two-sizes', marks=pytest.mark.slow),
    pytest.param('cpu', torch.bfloat16, SIZES, id='cpu-bf16-autocast', marks=pytest.mark.slow),
    on_cuda('cuda', None, SIZES, id='cuda-float32'),
    on_cuda('cuda', torch.float16, SIZES, id='cuda-fp16-autocast')])
def test_compiled_backbone_matches_eager_in_outputs_and_gradients(device, amp, sizes):
    """Inductor-generated kernels, forward and backward, against eager (in
    training: the memory's write path and the outer gradients through it),
    at ``sizes`` with the default settings.

    Under autocast (``--amp``: bfloat16 on CPU, float16 on CUDA) the fused
    kernels keep float32 where eager rounds each op, so both are held to the
    float32 result: the compiled outputs and every gradient must be as close
    to it as eager's under the same autocast (within 2x, plus 1% of the
    norm and a floor for gradients that are zero up to rounding), and the
    outputs must show autocast's rounding (it ran inside the compiled graph).
    The network has no random op (its one block's drop-path rate is 0), and
    Dynamo must really have compiled graphs for it (not fallen back to
    eager)."""
    torch._dynamo.reset()  # no graph cached by an earlier test
    graphs_before = graphs_compiled()
    eager = _tiny_backbone().to(device)
    compiled = _tiny_backbone().to(device)
    assert compile_model(compiled) == ['backbone']
    memory = next(m for m in eager.modules() if isinstance(m, NeuralMemory))
    assert memory.num_updates(8 * 12) == 5
    for size in sizes:
        x = torch.randn(*size).to(device)
        want_out, want_grads = _loss_and_grads(eager, x, amp)
        got_out, got_grads = _loss_and_grads(compiled, x, amp)
        assert graphs_compiled() > graphs_before
        if amp is None:
            for got, want in zip(got_out, want_out):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            for name, want in want_grads.items():
                torch.testing.assert_close(got_grads[name], want, rtol=1e-3, atol=1e-5,
                                           msg=f'gradient of {name}')
            continue
        exact_out, exact_grads = _loss_and_grads(eager, x)  # float32
        for got, want, exact in zip(got_out, want_out, exact_out):
            assert _dist(got, exact) <= 2 * _dist(want, exact) + 1e-3 * exact.norm()
            assert _dist(got, exact) > 1e-4 * exact.norm()  # autocast ran compiled
        for name, exact in exact_grads.items():
            bound = 2 * _dist(want_grads[name], exact) + 1e-2 * exact.norm() + 1e-6
            assert _dist(got_grads[name], exact) <= bound, name


# evaluation's input sizes: the first compiles with static shapes, the second
# with symbolic ones, which the rest reuse; they differ in their remainders
# modulo the stem's stride 4 and stage 2's stride 2 (the pads), in their
# chunk counts (2 stages of 1 block, chunk 16: 320-468 tokens, 19-29 updates,
# and 80-117 tokens, 4-7 updates), and in whether the tokens fill their
# last chunk (the memory's read pads by zero: 97x61, 128x40)
EVAL_SIZES = ((64, 96), (72, 104), (70, 90), (66, 99), (97, 61), (128, 40))


@pytest.mark.slow
@pytest.mark.torch_pinned
def test_evaluation_compiles_two_graphs_for_any_number_of_sizes():
    """Without gradients (validation, tools/test.py) the compiled parts use
    automatic dynamic shapes: six input sizes, none of them padded to a
    common multiple (ADE20K's test images are not), cost two graphs, not
    one each, and nothing about the sizes is guarded on (no graph per
    divisibility). With gradients (training) shapes stay static: a new size
    is a new graph. Dynamo's tracing only (backend 'eager'); Inductor's code
    for symbolic sizes is checked against eager below."""
    torch._dynamo.reset()
    holder = _tiny_backbone(arch=TWO_STAGES)
    eager = _tiny_backbone(arch=TWO_STAGES)
    compile_model(holder, backend='eager')
    holder.eval()
    eager.eval()
    before = graphs_compiled()
    for h, w in EVAL_SIZES:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            for got, want in zip(holder.backbone(x), eager.backbone(x)):
                torch.testing.assert_close(got, want)
    assert graphs_compiled() - before == 2
    before = graphs_compiled()
    holder.train()
    for h, w in EVAL_SIZES[:3]:
        holder.backbone(torch.randn(1, 3, h, w))
    assert graphs_compiled() - before == 3  # static: one graph per size


@pytest.mark.slow
@pytest.mark.torch_pinned
@pytest.mark.parametrize('device', DEVICES)
def test_compiled_inference_with_symbolic_sizes_matches_eager(device):
    """Inductor's kernels for symbolic sizes against eager, at the six
    evaluation sizes (two graphs: the last five share one)."""
    torch._dynamo.reset()
    holder = _tiny_backbone(arch=TWO_STAGES).to(device).eval()
    eager = _tiny_backbone(arch=TWO_STAGES).to(device).eval()
    compile_model(holder)
    before = graphs_compiled()
    for h, w in EVAL_SIZES:
        x = torch.randn(1, 3, h, w, device=device)
        with torch.no_grad():
            for got, want in zip(holder.backbone(x), eager.backbone(x)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert graphs_compiled() - before == 2


@pytest.mark.gpu
def test_reduce_overhead_training_accumulates_gradients_on_cuda():
    """Two accumulated passes through the compiled backbone (the mode
    ``compile_runner_model`` picks for ``reduce-overhead`` with
    ``accumulative_counts`` 2) sum the gradients eager sums."""
    from convneur_mm.engine.compile import training_compile_mode
    x = [torch.randn(2, 3, 32, 48, device='cuda', generator=torch.Generator('cuda').manual_seed(i))
         for i in range(2)]

    def accumulated(holder):
        holder.zero_grad(set_to_none=True)
        for batch in x:
            sum(o.square().mean() for o in holder.backbone(batch)).backward()
        return {n: p.grad.clone() for n, p in holder.named_parameters()}

    eager = accumulated(_tiny_backbone().cuda())
    holder = _tiny_backbone().cuda()
    compile_model(holder, mode='reduce-overhead',
                  training_mode=training_compile_mode('reduce-overhead', 2))
    compiled = accumulated(holder)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.torch_pinned
@pytest.mark.parametrize('mode, inference_dynamic', [
    ('default', None), ('max-autotune-no-cudagraphs', None),
    ('reduce-overhead', False), ('max-autotune', False)])
def test_each_part_compiles_two_isolated_regions(monkeypatch, mode, inference_dynamic):
    """Training (static) and evaluation (automatic dynamic shapes, but static
    where CUDA graphs are recorded: one per concrete size, unlimited) are
    separate torch.compile regions, each with its own recompile limit."""
    calls = _record_compile_calls(monkeypatch)
    compile_model(_tiny_backbone(), mode=mode)
    assert [c['dynamic'] for c in calls] == [False, inference_dynamic]
    assert all(c.get('isolate_recompiles', False) == compile_mod.ISOLATE_RECOMPILES
               and c['mode'] == mode for c in calls)


@pytest.mark.parametrize('mode, accumulation, training, want', [
    ('reduce-overhead', 4, True, 'default'),
    ('max-autotune', 16, True, 'max-autotune-no-cudagraphs'),
    ('reduce-overhead', 1, True, 'reduce-overhead'),   # no accumulation: CUDA graphs kept
    ('reduce-overhead', 4, False, 'reduce-overhead'),  # tools/test.py: nothing accumulates
    ('max-autotune-no-cudagraphs', 4, True, 'max-autotune-no-cudagraphs'),
    ('default', 8, True, 'default')])
def test_gradient_accumulation_trains_without_cuda_graphs(monkeypatch, mode, accumulation,
                                                          training, want):
    """A CUDA graph's replay overwrites the gradients the previous replay handed
    to ``param.grad``: with ``accumulative_counts > 1`` (the ImageNet configs)
    ``reduce-overhead`` and ``max-autotune`` stopped at the second iteration
    on CUDA. Training compiles without CUDA graphs there; evaluation keeps the
    mode asked for."""
    from types import SimpleNamespace

    from mmengine.config import Config
    cfg = Config(dict(optim_wrapper=dict(type='AmpOptimWrapper', accumulative_counts=accumulation,
                                         optimizer=dict(type='AdamW', lr=1e-3))))
    runner = SimpleNamespace(cfg=cfg, model=_tiny_backbone(),
                             register_hook=lambda *args, **kwargs: None)
    calls = _record_compile_calls(monkeypatch)
    compile_runner_model(runner, mode, training=training)
    assert [c['mode'] for c in calls] == [want, mode]
    assert [c['dynamic'] for c in calls][0] is False


def test_imagenet_configs_accumulate_gradients():
    """What the test above guards: every ImageNet config accumulates."""
    from mmengine.config import Config
    from convneur_mm.engine.compile import accumulative_counts
    for arch in ('m1', 'm2', 'm3', 'm4'):
        cfg = Config.fromfile(osp.join(REPO, 'configs', f'cls_convneur_{arch}_300e_in1k.py'))
        assert accumulative_counts(cfg) > 1, arch


def _record_compile_calls(monkeypatch) -> list:
    """torch.compile replaced by a recorder of its keyword arguments."""
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn
    monkeypatch.setattr(torch, 'compile', fake_compile)
    return calls


@pytest.mark.torch_pinned
def test_torch_without_isolated_recompiles_compiles_with_a_warning(monkeypatch):
    """torch < 2.13 has no ``isolate_recompiles`` (a TypeError on the H100's
    torch 2.11): the regions are compiled without it, and a warning says that
    they share one recompile limit."""
    monkeypatch.setattr(compile_mod, 'ISOLATE_RECOMPILES', False)
    compile_mod._warn_shared_recompile_limit.cache_clear()
    warnings = []
    monkeypatch.setattr(compile_mod, 'print_log', lambda msg, **kwargs: warnings.append(msg))
    calls = _record_compile_calls(monkeypatch)
    compile_model(_tiny_backbone())
    compile_model(_tiny_backbone())
    assert [c['dynamic'] for c in calls] == [False, None] * 2
    assert not any('isolate_recompiles' in c for c in calls)
    assert len(warnings) == 1 and 'share one recompile limit' in warnings[0]
    compile_mod._warn_shared_recompile_limit.cache_clear()


# training counts the closed-form Functions in the graph: torch 2.11 traces none of
# them (a version's tracing, not the GPU's); inference holds on other versions too
@pytest.mark.parametrize('training', [pytest.param(True, marks=pytest.mark.torch_pinned),
                                      False])
@pytest.mark.parametrize('device,amp', [
    pytest.param('cpu', None, id='cpu-float32'),
    pytest.param('cpu', torch.bfloat16, id='cpu-bf16-autocast'),
    # bf16 operands ('auto'), bmm with a float32 output in inference
    on_cuda('cuda', torch.bfloat16, id='cuda-bf16-autocast')])
def test_backbone_traces_without_graph_breaks(training, device, amp, monkeypatch):
    """The memory's hot path (write, scan, read) and the blocks are one graph:
    a break makes every block's ``branches`` a frame of its own, one graph per
    block, and past the recompile limit (8) the rest of the blocks run eager.
    In training the projections, the chunk gradients and the chunk read are
    their closed-form ``autograd.Function`` s, traced inside that graph, as
    are the 16-bit products that autograd differentiates (CUDA's bf16 operands)."""
    from convneur_mm.models.layers.memory_ops import common
    holder = _tiny_backbone(backward='closed_form').to(device)
    holder.backbone.train(training)
    x = torch.randn(2, 3, 32, 48, device=device)
    products, apply = [], common._Product16.apply
    monkeypatch.setattr(common._Product16, 'apply',
                        lambda *args: products.append(1) or apply(*args))

    def run(fn):
        with torch.set_grad_enabled(training), torch.autocast(
                device, dtype=amp or torch.float32, enabled=amp is not None):
            return fn(x)

    run(holder.backbone)  # eager: the 16-bit products under autograd, counted
    monkeypatch.undo()
    explanation = run(torch._dynamo.explain(holder.backbone))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    functions = explanation.graphs[0].code.count('autograd_function_apply(')
    assert functions == (3 + len(products) if training else 0)


def test_compiled_parts_and_bad_requests():
    holder = _tiny_backbone()
    assert compilable_parts(holder) == ['backbone']
    with pytest.raises(ValueError, match='no part'):
        compilable_parts(holder, ['neck'])
    with pytest.raises(ValueError, match='mode'):
        compile_model(holder, mode='fastest')
    compile_model(holder, backend='eager')
    with pytest.raises(ValueError, match='compiled twice'):
        compile_model(holder, backend='eager')


@pytest.mark.slow
def test_runner_trains_with_compiled_parts_and_plain_checkpoint_keys(tmp_path):
    """What tools/train.py --compile does, with Dynamo's tracing but without
    code generation (backend 'eager'), on the classification demo's model.

    About a minute on the shared 2-core VM (Dynamo traces the backbone and
    the head in training and in evaluation mode): the only test that runs the
    tools' runner path end to end with compiled parts, checkpoint included."""
    from convneur_mm.demo_data.imagenet import generate_imagenet_tiny
    root = str(tmp_path / 'imagenet_tiny')
    generate_imagenet_tiny(root, train_per_class=1, val_per_class=1)
    cfg = load_config(osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py'),
                      work_dir=str(tmp_path / 'work'))
    for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[split].dataset.data_root = root
        cfg[split].update(num_workers=0, persistent_workers=False, batch_size=2)
    # the one-block arch: what is tested is the wiring, and Dynamo traces it faster
    cfg.model.backbone.update(arch=TINY, out_indices=(0, ))
    cfg.model.head.in_channels = TINY['dims'][-1]
    cfg.train_cfg.update(max_epochs=2, val_interval=2)  # validation runs compiled too
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2)
    runner = build_runner(cfg)
    before = graphs_compiled()
    compile_runner_model(runner, backend='eager')
    runner.train()
    assert graphs_compiled() > before  # the compiled forwards ran
    # the log of what each epoch compiled: the second training epoch (same
    # shapes) compiles nothing, validation its eval-mode graphs
    counts = dict(next(h for h in runner.hooks
                       if isinstance(h, CompilationCountHook)).history)
    assert counts['training epoch 1'] > 0 and counts['training epoch 2'] == 0, counts
    assert counts['validation'] > 0, counts
    model = runner.model
    assert compilable_parts(model) == ['backbone', 'head']  # the classifier has no neck
    assert all('forward' in vars(getattr(model, p)) for p in ('backbone', 'head'))
    saved = torch.load(str(tmp_path / 'work' / 'epoch_2.pth'), map_location='cpu')
    assert set(saved['state_dict']) == set(model.state_dict())
    assert not any('_orig_mod' in k for k in saved['state_dict'])
    cfg.compile = True
    with pytest.raises(ValueError, match='cfg.compile'):
        compile_runner_model(build_runner(cfg))


def test_compile_buckets_a_detectors_training_batches(tmp_path):
    """``--compile`` on the COCO config: its data preprocessor pads training
    batches to (800, 1088, 1344); configs that are no detector, or that have
    batch augments of their own, are left alone."""
    from convneur_mm.engine.compile import bucket_detection_sizes
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    cfg = load_config(osp.join(REPO, 'configs', 'cascade_rcnn_convneur_m3_1x_coco.py'),
                      work_dir=str(tmp_path))
    assert bucket_detection_sizes(cfg) == (800, 1088, 1344)
    augment = cfg.model.data_preprocessor.batch_augments[0]
    assert (augment.type, augment.pad_mask) == ('convneur_mm.BucketPad', True)
    assert bucket_detection_sizes(cfg) is None  # batch augments of its own: left alone
    preprocessor = build_model(cfg, init=False).data_preprocessor
    batch = dict(inputs=[torch.zeros(3, 800, 1000, dtype=torch.uint8)] * 2,
                 data_samples=None)
    assert preprocessor(batch, training=True)['inputs'].shape[-2:] == (800, 1088)
    # mmdet applies batch augments in training only: evaluation pads to 32
    assert preprocessor(batch, training=False)['inputs'].shape[-2:] == (800, 1024)
    seg = load_config(osp.join(REPO, 'configs', 'fpn_convneur_m2_80k_ade20k.py'),
                      work_dir=str(tmp_path))
    assert bucket_detection_sizes(seg) is None
    # mmdet's multi-scale training (RandomResize over a range of two sizes): the
    # buckets span the range (it stopped --compile with a TypeError)
    multi = load_config(osp.join(REPO, 'configs', 'cascade_rcnn_convneur_m3_1x_coco.py'),
                        work_dir=str(tmp_path))
    resize = next(t for t in multi.train_dataloader.dataset.pipeline if t.type == 'Resize')
    resize.update(type='RandomResize', scale=[(1333, 640), (1333, 800)])
    assert bucket_detection_sizes(multi) == (640, 992, 1344)
