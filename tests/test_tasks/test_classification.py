"""ImageNet-1K classification: the paper's recipe in the merged configs, the
tiny dataset, a training step with the full augmentation, the learning-rate
schedule with --auto-scale-lr, and top-1/top-5 through tools/test.py."""
import filecmp
import glob
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import convneur_mm  # noqa: F401
from convneur_mm.demo_data.imagenet import CLASSES, generate_imagenet_tiny
from convneur_mm.apis.launch import build_runner, load_config
from convneur_mm.utils.paths import config_dir, tools_dir
from convneur_mm.apis.toolbox import build_model

from ..threads import one_thread

DEMO = 'demo/cls_convneur_m1_imagenet_tiny.py'
ARCHS = {  # arch: (head in_channels, drop-path rate) as the configs document them
    'm1': (320, 0.05), 'm2': (384, 0.05), 'm3': (512, 0.1), 'm4': (640, 0.15)}


def config(name: str) -> str:
    return osp.join(config_dir(), name)


def tiny_cls_cfg(data_root: str, work_dir: str, name: str = DEMO, **options):
    """A classification config on the tiny dataset, for in-process runs."""
    cfg = load_config(config(name), work_dir=work_dir)
    for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[split].dataset.data_root = data_root
    cfg.experiment_name = osp.basename(work_dir)  # unique, for MMEngine's singletons
    cfg.merge_from_dict(options)
    return cfg


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope='module')
def tiny_imagenet(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('imagenet_tiny'))
    generate_imagenet_tiny(root, train_per_class=16, val_per_class=5)
    return root


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_merged_config_is_the_papers_recipe(arch):
    cfg = load_config(config(f'cls_convneur_{arch}_300e_in1k.py'))
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW'
    assert (optim.optimizer.lr, optim.optimizer.eps, optim.optimizer.weight_decay) == \
        (4e-3, 1e-8, 0.05)
    assert optim.get('clip_grad') is None  # the Swin base clips at 5; the paper does not
    assert 'constructor' not in optim and 'layer_decay_rate' not in optim.get('paramwise_cfg', {})
    assert optim.get('type', 'OptimWrapper') == 'OptimWrapper'
    warmup, cosine = cfg.param_scheduler
    assert (warmup.type, warmup.get('begin', 0), warmup.end) == ('LinearLR', 0, 20)
    assert (cosine.type, cosine.begin, cosine.eta_min) == ('CosineAnnealingLR', 20, 1e-6)
    assert cosine.get('end') in (None, 300) and cosine.convert_to_iter_based
    assert (cfg.train_cfg.by_epoch, cfg.train_cfg.max_epochs) == (True, 300)
    # the paper's 4096 = 8 GPUs x per-GPU batch x gradient accumulation
    batch, accumulate = cfg.train_dataloader.batch_size, optim.accumulative_counts
    assert 8 * batch * accumulate == 4096 and batch & (batch - 1) == 0
    assert cfg.auto_scale_lr.base_batch_size == 8 * batch  # --auto-scale-lr sees no accumulation
    transforms = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert transforms == ['LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip',
                          'RandAugment', 'RandomErasing', 'PackInputs']
    assert cfg.train_dataloader.dataset.pipeline[1].scale == 224
    assert [(a.type, a.alpha) for a in cfg.model.train_cfg.augments] == [('Mixup', 0.8),
                                                                        ('CutMix', 1.0)]
    assert cfg.model.head.loss.type == 'LabelSmoothLoss'
    assert cfg.model.head.loss.label_smooth_val == 0.1
    backbone = cfg.model.backbone
    assert (backbone.arch, backbone.drop_path_rate) == (arch, ARCHS[arch][1])
    assert (backbone.memory_cfg.chunk_size, backbone.memory_cfg.max_lr) == (196, 1.0)
    assert cfg.model.head.in_channels == ARCHS[arch][0]
    assert cfg.val_evaluator.topk == (1, 5) and cfg.test_evaluator.topk == (1, 5)


@pytest.mark.parametrize('name', [f'cls_convneur_{a}_300e_in1k.py' for a in sorted(ARCHS)]
                         + [DEMO])
def test_configs_build_and_classify(name):
    cfg = load_config(config(name))
    model = build_model(cfg).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64), mode='tensor')
    assert logits.shape == (2, cfg.model.head.num_classes)
    assert torch.isfinite(logits).all()


def test_demo_config_changes_only_sizes_classes_and_schedule():
    real = load_config(config('cls_convneur_m1_300e_in1k.py'))
    demo = load_config(config(DEMO))
    for split, sizes in (('train_dataloader', {'scale': 64}),
                         ('test_dataloader', {'scale': 73, 'crop_size': 64})):
        for ours, theirs in zip(demo[split].dataset.pipeline, real[split].dataset.pipeline,
                                strict=True):
            changed = {k for k in ours if ours[k] != theirs.get(k) and k != '_scope_'}
            assert changed <= set(sizes), (ours, theirs)
            assert all(ours[k] == sizes[k] for k in changed)
    assert demo.model.backbone == real.model.backbone
    assert demo.model.train_cfg == real.model.train_cfg
    assert demo.model.head.num_classes == demo.data_preprocessor.num_classes == len(CLASSES)
    assert demo.optim_wrapper.optimizer == dict(real.optim_wrapper.optimizer, lr=2e-3)
    assert demo.optim_wrapper.clip_grad is None
    assert demo.auto_scale_lr.base_batch_size == demo.train_dataloader.batch_size * 2


# -------------------------------------------------------------------- data
def test_tiny_imagenet_layout_and_determinism(tmp_path):
    roots = [str(tmp_path / name) for name in ('a', 'b')]
    for root in roots:
        generate_imagenet_tiny(root, train_per_class=2, val_per_class=1, seed=3)
    listing = [sorted(os.path.relpath(osp.join(d, f), roots[0])
                      for d, _, files in os.walk(roots[0]) for f in files)]
    assert len(listing[0]) == 3 + 10 * 3
    match, mismatch, errors = filecmp.cmpfiles(roots[0], roots[1], listing[0], shallow=False)
    assert not mismatch and not errors
    lines = open(osp.join(roots[0], 'meta', 'val.txt')).read().split('\n')[:-1]
    assert sorted(int(line.split()[1]) for line in lines) == list(range(10))
    assert open(osp.join(roots[0], 'meta', 'classes.txt')).read().split() == list(CLASSES)


def test_dataset_reads_the_tiny_imagenet(tiny_imagenet, tmp_path):
    from mmpretrain.registry import DATASETS
    cfg = load_config(config(DEMO))
    dataset = DATASETS.build(dict(cfg.val_dataloader.dataset, data_root=tiny_imagenet))
    assert len(dataset) == 50 and tuple(dataset.CLASSES) == CLASSES  # the config's names
    sample = dataset[0]
    assert tuple(sample['inputs'].shape) == (3, 64, 64)
    labels = [dataset.get_gt_labels()[i] for i in range(len(dataset))]
    assert np.bincount(labels).tolist() == [5] * 10


# ---------------------------------------------------------------- training
def test_training_step_with_mixup_cutmix_randaugment(tiny_imagenet, tmp_path):
    """Two epochs of one iteration (warm-up, then cosine) of the demo config."""
    cfg = tiny_cls_cfg(tiny_imagenet, str(tmp_path / 'aug'), **{
        'train_dataloader.batch_size': 8,
        'train_dataloader.dataset.indices': list(range(0, 160, 20)),  # 8 classes
        'train_cfg.max_epochs': 2, 'val_cfg': None, 'val_dataloader': None,
        'val_evaluator': None, 'default_hooks.checkpoint': None})
    runner = build_runner(cfg)
    model = runner.model
    augments = [type(a).__name__ for a in model.data_preprocessor.batch_augments.augments]
    assert augments == ['Mixup', 'CutMix']
    pipeline = [type(t).__name__ for t in runner.train_dataloader.dataset.pipeline.transforms]
    assert {'RandomResizedCrop', 'RandAugment', 'RandomErasing'} <= set(pipeline)
    # the batch augmentation mixes the one-hot targets
    batch = model.data_preprocessor(next(iter(runner.train_dataloader)), training=True)
    scores = torch.stack([s.gt_score for s in batch['data_samples']])
    assert scores.shape == (8, 10)
    assert torch.allclose(scores.sum(1), torch.ones(8))
    assert (scores.max(1).values < 1).any()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner.train()
    assert runner.iter == 2
    loss = runner.message_hub.get_scalar('train/loss').current()
    assert np.isfinite(loss) and loss > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith('backbone.stages.0.0.global_branch.memory') for k in changed)
    assert 'head.fc.weight' in changed


def test_schedule_and_auto_scale_lr_on_the_real_config(tiny_imagenet, tmp_path):
    """The real 300-epoch config as the Runner builds it with --auto-scale-lr:
    lr scaled from the paper's batch 4096 to the effective one (x accumulation), 20 warm-up epochs, cosine to 1e-6 at 300."""
    batch_size = 80  # 160 images -> 2 iterations per epoch, 1 process
    cfg = tiny_cls_cfg(tiny_imagenet, str(tmp_path / 'sched'), 'cls_convneur_m1_300e_in1k.py',
                       **{'train_dataloader.batch_size': batch_size,
                          'train_dataloader.num_workers': 0,
                          'auto_scale_lr.enable': True})
    runner = build_runner(cfg)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.scale_lr(runner.optim_wrapper, runner.auto_scale_lr)
    peak = 4e-3 * batch_size * cfg.optim_wrapper.accumulative_counts / 4096  # effective batch
    assert runner.optim_wrapper.param_groups[0]['lr'] == pytest.approx(peak)
    assert runner.optim_wrapper.optimizer.defaults['eps'] == 1e-8
    assert not runner.optim_wrapper.clip_grad_kwargs
    schedulers = runner.build_param_scheduler(runner.param_schedulers)
    per_epoch = len(runner.train_dataloader)
    assert per_epoch == 2
    assert [(s.begin, s.end) for s in schedulers] == [(0, 20 * per_epoch),
                                                      (20 * per_epoch, 300 * per_epoch)]
    lrs = []
    for _ in range(300 * per_epoch):
        lrs.append(runner.optim_wrapper.param_groups[0]['lr'])
        for scheduler in schedulers:
            scheduler.step()
    assert lrs[0] == pytest.approx(peak * 1e-3)
    assert max(lrs) == pytest.approx(peak) == lrs[20 * per_epoch]
    assert lrs[10 * per_epoch] == pytest.approx(peak / 2, rel=0.03)
    assert lrs[160 * per_epoch] == pytest.approx((peak + 1e-6) / 2, rel=1e-2)
    assert lrs[-1] == pytest.approx(1e-6, rel=0.05)
    assert all(b <= a + 1e-15 for a, b in zip(lrs[20 * per_epoch:], lrs[20 * per_epoch + 1:]))


# -------------------------------------------------------------- evaluation
def _run_tool(*args: str) -> str:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    result = subprocess.run(list(args), capture_output=True, text=True, env=env,
                            cwd=osp.dirname(tools_dir()), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _table_metrics(output: str) -> dict:
    return {k: float(v) for k, v in re.findall(r'\| (accuracy/top[15]) \| ([\d.]+) \|', output)}


@pytest.fixture(scope='module')
def trained_checkpoint(tiny_imagenet, tmp_path_factory) -> str:
    """The M1 classifier trained for 40 iterations at 32x32 without RandAugment,
    Random Erasing, Mixup and CutMix (the full recipe learns too slowly for a
    unit test; the demo shows that it learns): a checkpoint whose accuracy is
    far from chance, so that a checkpoint not (fully) loaded would show."""
    work_dir = str(tmp_path_factory.mktemp('trained'))
    cfg = tiny_cls_cfg(tiny_imagenet, work_dir, **{
        'model.train_cfg': None, 'model.backbone.drop_path_rate': 0.0,
        'optim_wrapper.optimizer.lr': 4e-3, 'train_dataloader.batch_size': 16,
        'train_cfg.max_epochs': 4, 'val_cfg': None, 'val_dataloader': None,
        'val_evaluator': None, 'default_hooks.checkpoint.interval': 4})
    cfg.train_dataloader.dataset.pipeline = [
        dict(t, scale=32) if t.type == 'RandomResizedCrop' else t
        for t in cfg.train_dataloader.dataset.pipeline
        if t.type not in ('RandAugment', 'RandomErasing')]
    build_runner(cfg).train()
    return osp.join(work_dir, 'epoch_4.pth')


# ResizeEdge and CenterCrop at the training size of ``trained_checkpoint``
EVAL_32 = {'test_dataloader.dataset.pipeline.1.scale': 37,
           'test_dataloader.dataset.pipeline.2.crop_size': 32}


def _manual_accuracy(checkpoint: str, data_root: str, tmp_path) -> dict:
    """Top-1/top-5 computed here, from the checkpoint's logits and meta/val.txt."""
    from mmengine.runner import load_checkpoint
    cfg = tiny_cls_cfg(data_root, str(tmp_path / 'manual'), **EVAL_32)
    runner = build_runner(cfg)
    model = runner.model.eval()
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    hits1 = hits5 = total = 0
    with torch.no_grad():
        for data in runner.test_dataloader:
            batch = model.data_preprocessor(data, training=False)
            logits = model(batch['inputs'], mode='tensor')
            labels = torch.tensor([int(s.gt_label) for s in batch['data_samples']])
            top5 = logits.topk(5, dim=1).indices
            hits1 += (top5[:, 0] == labels).sum().item()
            hits5 += (top5 == labels[:, None]).any(1).sum().item()
            total += len(labels)
    assert total == 50
    return {'accuracy/top1': 100 * hits1 / total, 'accuracy/top5': 100 * hits5 / total}


def test_test_py_reports_top1_top5_of_a_trained_checkpoint(trained_checkpoint, tiny_imagenet,
                                                           tmp_path):
    config_path = config(DEMO)
    out = _run_tool(sys.executable, 'tools/test.py', config_path, trained_checkpoint,
                    '--work-dir', str(tmp_path / 'test'), '--show-dir', str(tmp_path / 'drawn'),
                    '--show-interval', '5', '--cfg-options',
                    f'test_dataloader.dataset.data_root={tiny_imagenet}',
                    *(f'{k}={v}' for k, v in EVAL_32.items()))
    metrics = _table_metrics(out)
    # every 5th of the 50 images drawn (MMPretrain's hook alone: the first only)
    assert len(glob.glob(str(tmp_path / 'drawn' / '**' / '*.png'), recursive=True)) == 10
    assert set(metrics) == {'accuracy/top1', 'accuracy/top5'}, out
    expected = _manual_accuracy(trained_checkpoint, tiny_imagenet, tmp_path)
    assert metrics == pytest.approx(expected, abs=1e-3)
    assert metrics['accuracy/top1'] >= 50  # chance: 10
    assert metrics['accuracy/top5'] >= metrics['accuracy/top1']
