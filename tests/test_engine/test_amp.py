"""Mixed precision: ``tools/train.py --amp`` trains a demo config
without NaN/inf and ``tools/test.py --amp`` evaluates its checkpoint; under
``--amp`` (bf16 autocast on the CPU) the backbone's convolutions and linear
layers run in bf16 while the neural memory's inner loop stays float32.

The memory alone under autocast is tested in
tests/test_models/test_layers/test_neural_memory.py; here it is the whole
backbone, inside ``CpuAmpOptimWrapper.optim_context`` as ``--amp`` runs it.
"""
import glob
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

import convneur_mm.engine  # noqa: F401  (registers CpuAmpOptimWrapper)
from convneur_mm.demo_data.imagenet import generate_imagenet_tiny
from convneur_mm.apis.launch import enable_amp, load_config
from convneur_mm.models import ConvNeur
from convneur_mm.models.layers.neural_memory import NeuralMemory
from ..paths import REPO

DEMO = osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py')
TINY = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], memory_dim=8)


def _record_dtypes(model):
    """Output dtypes of every conv / linear layer, split by whether the layer
    is the stem's conv, a global branch's input projection or inside a
    NeuralMemory, and of each memory's inner computation and of the stem."""
    seen = {'memory': set(), 'other': set(), 'inner': set(), 'memory_out': set(),
            'stem_conv': set(), 'stem_out': set(), 'proj_in': set()}
    stem = model.downsample_layers[0]
    stem.register_forward_hook(lambda m, i, o: seen['stem_out'].add(o.dtype))
    memory_layers = {id(m) for mem in model.modules() if isinstance(mem, NeuralMemory)
                     for m in mem.modules()}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            key = ('stem_conv' if module is stem[0] else
                   'proj_in' if name.endswith('global_branch.proj_in') else
                   'memory' if id(module) in memory_layers else 'other')
            module.register_forward_hook(lambda m, i, o, key=key: seen[key].add(o.dtype))
        if isinstance(module, NeuralMemory):
            project = module.project  # the inner computation's start, on its copy of x

            def recorded(x, num_updates, plan, project=project):
                proj = project(x, num_updates, plan)
                seen['inner'].update({x.dtype} | {t.dtype for t in proj if t is not None})
                return proj

            module.project = recorded
            module.register_forward_hook(lambda m, i, o: seen['memory_out'].add(o.dtype))
    return seen


def test_amp_runs_convolutions_in_bf16_and_the_memory_in_float32():
    torch.manual_seed(0)
    # chunk 16: stage 1 (16x16 tokens) has 16 chunks and writes, stages 3-4 one
    model = ConvNeur(arch=TINY, memory_cfg=dict(chunk_size=16), out_indices=(0, 1, 2, 3),
                     gap_before_final_norm=False).train()
    model.init_weights()
    wrapper = build_optim_wrapper(model, dict(type='convneur_mm.CpuAmpOptimWrapper',
                                              optimizer=dict(type='SGD', lr=0.1)))
    seen = _record_dtypes(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with wrapper.optim_context(model):
        outs = model(torch.randn(2, 3, 64, 64))
    assert seen['other'] == {torch.bfloat16}  # dwconvs, MLPs, downsampling, proj_out
    # float32 where float16 gradients overflowed (the COCO detector, fp16):
    # the stem (its output too, as CUDA's float32 LayerNorm leaves it) and
    # the global branches' input projections
    assert seen['stem_conv'] == seen['stem_out'] == seen['proj_in'] == {torch.float32}
    assert seen['memory'] == {torch.float32}  # keys, values, queries, gates
    assert seen['inner'] == {torch.float32}
    assert seen['memory_out'] == {torch.float32}  # proj_out casts it, as autocast does
    loss = sum(o.float().square().mean() for o in outs)
    wrapper.update_params(loss)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name  # master weights stay float32
        assert torch.isfinite(param).all(), name
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()
               if 'memory.init_w' in n)


# ------------------------------------------- which wrapper --amp picks, per device
@pytest.mark.parametrize('cuda,dtype,expect', [
    (True, None, ('AmpOptimWrapper', 'float16', 'dynamic')),  # fp16 with loss scaling
    (True, 'bfloat16', ('AmpOptimWrapper', 'bfloat16', None)),
    (False, None, ('convneur_mm.CpuAmpOptimWrapper', None, None)),
])
def test_amp_wrapper_follows_the_device(monkeypatch, cuda, dtype, expect):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
    cfg = load_config(DEMO)
    enable_amp(cfg, dtype)
    wrapper = cfg.optim_wrapper
    assert (wrapper.type, wrapper.get('dtype'), wrapper.get('loss_scale')) == expect


@pytest.mark.parametrize('dtype,expect', [
    (None, ('bfloat16', None)),  # the config's own, kept
    ('float16', ('float16', 'dynamic')),  # the flag's, with a loss scale
])
def test_amp_keeps_a_configs_own_mixed_precision_but_for_the_dtype_asked(monkeypatch, dtype,
                                                                         expect):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = load_config(DEMO)
    cfg.optim_wrapper.type, cfg.optim_wrapper.dtype = 'AmpOptimWrapper', 'bfloat16'
    enable_amp(cfg, dtype)
    assert (cfg.optim_wrapper.dtype, cfg.optim_wrapper.get('loss_scale')) == expect
    cfg.optim_wrapper.dtype, cfg.optim_wrapper.loss_scale = 'float16', 512.0
    enable_amp(cfg)
    assert (cfg.optim_wrapper.dtype, cfg.optim_wrapper.loss_scale) == ('float16', 512.0)


def test_amp_on_the_cpu_refuses_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match='bfloat16 only'):
        enable_amp(load_config(DEMO), 'float16')


# ------------------------------------------------- the tools, with --amp
# (on the CPU, also on a GPU host: tests/conftest.py empties CUDA_VISIBLE_DEVICES)
@pytest.fixture(scope='module')
def tiny_imagenet(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('imagenet_tiny'))
    generate_imagenet_tiny(root, train_per_class=2, val_per_class=1)
    return root


def _run(*args, data_root):
    env = dict(os.environ, IMAGENET_TINY_ROOT=data_root, OMP_NUM_THREADS='1',
               CUDA_VISIBLE_DEVICES='')  # the CPU path: CpuAmpOptimWrapper below
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True)


def test_train_and_test_with_amp(tiny_imagenet, tmp_path):
    """Two epochs of 3 iterations (20 images, batch 8; the schedule's warm-up
    takes one epoch) with the demo's full augmentation (RandAugment, Mixup,
    CutMix, Random Erasing), then evaluation of the checkpoint."""
    work_dir = tmp_path / 'work'
    train = _run(osp.join(REPO, 'tools', 'train.py'), DEMO, '--amp', '--work-dir', str(work_dir),
                 '--cfg-options', 'train_dataloader.batch_size=8', 'train_cfg.max_epochs=2',
                 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
                 'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
                 'log_processor.window_size=1', data_root=tiny_imagenet)
    assert train.returncode == 0, train.stderr[-3000:]
    (run_dir, ) = glob.glob(str(work_dir / '2*' / 'vis_data'))
    config = open(osp.join(run_dir, 'config.py')).read()
    assert "type='convneur_mm.CpuAmpOptimWrapper'" in config
    records = [json.loads(line) for line in open(osp.join(run_dir, 'scalars.json'))]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 6
    assert all(math.isfinite(loss) and loss > 0 for loss in losses), losses
    checkpoint = work_dir / 'epoch_2.pth'
    state = torch.load(checkpoint, weights_only=True)['state_dict']
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    test = _run(osp.join(REPO, 'tools', 'test.py'), DEMO, str(checkpoint), '--amp',
                '--work-dir', str(tmp_path / 'test'), data_root=tiny_imagenet)
    assert test.returncode == 0, test.stderr[-3000:]
    metrics = {k: float(v) for k, v in
               re.findall(r'\| (accuracy/top[15]) \| ([\d.]+) \|', test.stdout)}
    assert set(metrics) == {'accuracy/top1', 'accuracy/top5'}, test.stdout[-2000:]
    assert 0 <= metrics['accuracy/top1'] <= metrics['accuracy/top5'] <= 100
    (test_dir, ) = glob.glob(str(tmp_path / 'test' / '2*' / 'vis_data'))
    assert re.search(r"test_cfg = dict\(fp16=True", open(osp.join(test_dir, 'config.py')).read())
