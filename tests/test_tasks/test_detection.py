"""Cascade Mask R-CNN on COCO: the paper's recipe in our configs,
CPU training and prediction with the real config, a train-then-evaluate run
through the tools that prints COCO tables, and clear errors for bad paths."""
import os.path as osp
import re
import subprocess
import sys

import mmengine
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS, init_default_scope
from torch import nn

from convneur_mm.demo_data.coco import generate_coco_tiny
from convneur_mm.apis.launch import build_runner, load_config, missing_data_paths
from convneur_mm.apis.toolbox import build_model, dummy_batch
from ..paths import REPO
from .task_utils import on_tiny_coco, train_and_diff

DEMO = osp.join(REPO, 'configs', 'demo', 'cascade_rcnn_convneur_m3_coco_tiny.py')
CONFIGS = {'cascade_rcnn_convneur_m2_1x_coco.py': ('m2', [48, 96, 192, 384]),
           'cascade_rcnn_convneur_m3_1x_coco.py': ('m3', [64, 128, 256, 512])}


@pytest.fixture(scope='module')
def coco_tiny(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('coco_tiny')) + '/'
    generate_coco_tiny(root, num_train=8, num_val=6)
    return root


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_has_the_paper_recipe_and_builds(name):
    arch, dims = CONFIGS[name]
    cfg = load_config(name)
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch) == ('convneur_mm.ConvNeur', arch)
    assert backbone.memory_cfg == dict(chunk_size=4096, max_lr=1e-3)
    assert backbone.init_cfg.type == 'Pretrained' and backbone.init_cfg.prefix == 'backbone.'
    assert cfg.model.type == 'CascadeRCNN' and 'mask_head' in cfg.model.roi_head
    # 2 images x 4 GPUs, 1333x800 single scale for training and testing
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 8
    for loader in ('train_dataloader', 'test_dataloader'):
        steps = {t.type: t for t in cfg[loader].dataset.pipeline}
        assert steps['Resize'].scale == (1333, 800)
        assert cfg[loader].dataset.data_root == 'data/coco/'
    assert 'TestTimeAug' not in str(cfg.test_dataloader)
    assert cfg.test_evaluator.metric == ['bbox', 'segm']
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', lr=0.02, momentum=0.9,
                                               weight_decay=1e-4)
    assert cfg.train_cfg.max_epochs == 12
    model = build_model(cfg, init=False).eval()
    assert model.backbone.dims == dims
    assert [m.in_channels for m in model.neck.lateral_convs] == dims
    with torch.no_grad():
        feats = model.extract_feat(dummy_batch(model, 'mmdet', (96, 128))['inputs'])
    assert [f.shape[-2:] for f in feats] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]


def test_schedule_is_warmup_then_steps_at_8_and_11():
    cfg = load_config('cascade_rcnn_convneur_m3_1x_coco.py')
    optimizer = build_optim_wrapper(nn.Linear(2, 2), cfg.optim_wrapper)
    init_default_scope('mmdet')
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=optimizer, epoch_length=100))
                  if s.get('by_epoch', True) else
                  PARAM_SCHEDULERS.build(dict(s, optimizer=optimizer))
                  for s in cfg.param_scheduler]
    warmup = [s for s in schedulers if not s.by_epoch]
    epochs = [s for s in schedulers if s.by_epoch]
    lrs = []
    for _ in range(500):
        lrs.append(optimizer.param_groups[0]['lr'])
        for s in warmup:
            s.step()
    assert lrs[0] == pytest.approx(0.02 * 0.001)
    assert lrs[250] == pytest.approx(0.02 * (0.001 + 0.999 * 0.5), rel=1e-2)  # linear
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.02)
    per_epoch = []
    for _ in range(12):
        per_epoch.append(optimizer.param_groups[0]['lr'])
        for s in epochs:
            s.step()
    assert per_epoch == pytest.approx([0.02] * 8 + [0.002] * 3 + [0.0002])


def test_missing_pretrained_checkpoint_names_the_path(tmp_path):
    cfg = load_config('cascade_rcnn_convneur_m3_1x_coco.py')
    path = str(tmp_path / 'no_such_backbone.pth')
    cfg.model.backbone.init_cfg.checkpoint = path
    model = build_model(cfg, init=False)
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        model.init_weights()


# --------------------------------------------------- training on the CPU
@pytest.mark.slow
def test_real_config_trains_one_iteration_and_predicts_on_cpu(coco_tiny, tmp_path):
    """The real M3 config (1333x800, 80 classes) in one CPU process."""
    cfg = load_config(osp.join(REPO, 'configs', 'cascade_rcnn_convneur_m3_1x_coco.py'),
                      work_dir=str(tmp_path))
    on_tiny_coco(cfg, coco_tiny)
    cfg.train_dataloader.batch_size = 1
    cfg.train_dataloader.dataset.indices = 2  # image 0 has no object, image 1 a crowd
    cfg.train_cfg.update(max_epochs=1, val_begin=2)
    cfg.default_hooks.checkpoint = None
    runner, changed = train_and_diff(cfg)
    model = runner.model
    loss = runner.message_hub.get_scalar('train/loss').current()
    assert 0 < loss < float('inf')
    assert {'backbone', 'neck', 'rpn_head', 'roi_head'} <= changed

    model.eval()
    data = next(iter(runner.build_dataloader(cfg.test_dataloader)))
    with torch.no_grad():
        pred = model.test_step(data)[0]
    assert pred.img_shape == (800, 1000)  # 128x160 scaled to fit 1333x800
    instances = pred.pred_instances
    assert instances.bboxes.shape[1] == 4 and len(instances) <= 100
    assert instances.masks.shape[-2:] == tuple(pred.ori_shape)


@pytest.mark.slow
def test_roi_heads_learn_to_classify_and_segment(coco_tiny, tmp_path):
    """The demo's detector memorizes 4 images: within 15 iterations the first
    stage's classification loss falls from about 1.6 to under 0.5 (measured:
    0.19) and its mask loss from 0.69 (chance) to under 0.45 (0.23). With the
    backbone's maps in channels-last memory (which mmcv's RoIAlign misreads)
    they stayed at 0.90 and 0.62: the RoI heads pooled scrambled features.
    AdamW (RoI heads x5) rather than the demo's SGD, which needs more than
    15 steps to settle: the test checks the features, not the recipe."""
    cfg = load_config(DEMO, work_dir=str(tmp_path))
    cfg.train_dataloader.batch_size = 4
    cfg.train_dataloader.dataset.update(data_root=coco_tiny, indices=[2, 3, 4, 5])
    cfg.train_cfg.update(max_epochs=15)
    cfg.optim_wrapper = dict(
        type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
        paramwise_cfg=dict(custom_keys=dict(roi_head=dict(lr_mult=5.0))))
    cfg.param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False,
                                begin=0, end=10)]
    cfg.default_hooks.checkpoint = None
    runner = build_runner(cfg)
    runner.train()
    history = runner.message_hub.log_scalars
    cls_loss, mask_loss = (history[f'train/s0.loss_{k}'].mean(3) for k in ('cls', 'mask'))
    assert cls_loss < 0.5 and mask_loss < 0.45, (cls_loss, mask_loss)


def _coco_rows(stdout: str) -> dict:
    """The bbox / segm rows of tools/test.py's COCO table: {task: [AP, AP50, ...]}
    ('-', no object of that size, as None)."""
    return {task: [None if v.strip() == '-' else float(v) for v in values.split('|')]
            for task, values in re.findall(r'^\| (bbox|segm) \|(.*)\|$', stdout, re.M)}


@pytest.fixture(scope='module')
def demo_run(coco_tiny, tmp_path_factory) -> dict:
    """tools/train.py on the demo config for one epoch, then tools/test.py on
    its checkpoint with ``--out``: what the two tests below read."""
    root = tmp_path_factory.mktemp('demo_run')
    work_dir, dump = root / 'work', root / 'predictions.pkl'
    with pytest.MonkeyPatch.context() as env:
        env.setenv('COCO_TINY_ROOT', coco_tiny)
        train = _run(osp.join(REPO, 'tools', 'train.py'), DEMO, '--work-dir', str(work_dir),
                     '--cfg-options', 'train_cfg.max_epochs=1', 'param_scheduler.1.end=1',
                     'default_hooks.checkpoint.interval=1')
        assert train.returncode == 0, train.stderr[-3000:]
        checkpoint = work_dir / 'epoch_1.pth'
        test = _run(osp.join(REPO, 'tools', 'test.py'), DEMO, str(checkpoint),
                    '--work-dir', str(root / 'test'), '--out', str(dump))
    return dict(work_dir=work_dir, checkpoint=checkpoint, dump=dump, test=test)


def test_train_then_evaluate_prints_coco_tables(demo_run):
    """tools/train.py on the demo config, then tools/test.py on its checkpoint:
    a checkpoint is written and both COCO tables are printed."""
    work_dir, checkpoint, test = demo_run['work_dir'], demo_run['checkpoint'], demo_run['test']
    assert checkpoint.is_file()
    assert open(work_dir / 'last_checkpoint').read().strip() == str(checkpoint)
    assert test.returncode == 0, test.stderr[-3000:]
    rows = _coco_rows(test.stdout)
    assert set(rows) == {'bbox', 'segm'}, test.stdout[-2000:]
    for values in rows.values():
        assert len(values) == 6 and all(v is None or 0 <= v <= 100 for v in values)
    # --out: masks as RLE, no ground truth (MMDetection's DumpDetResults)
    predictions = mmengine.load(str(demo_run['dump']))
    assert predictions and all('gt_instances' not in p for p in predictions)
    masks = [m for p in predictions for m in p['pred_instances']['masks']]
    assert masks and all(isinstance(m, dict) and 'counts' in m for m in masks)


def test_test_py_evaluates_the_checkpoints_weights(demo_run, coco_tiny, tmp_path, monkeypatch):
    """tools/test.py evaluated the checkpoint's weights: its first prediction
    is the one an in-process model with those weights makes, and not the one
    of a model that missed the checkpoint (AP of a model trained 1 epoch on 8
    images can't tell the two apart: both are near 0)."""
    monkeypatch.setenv('COCO_TINY_ROOT', coco_tiny)
    assert demo_run['test'].returncode == 0, demo_run['test'].stderr[-3000:]
    first = mmengine.load(str(demo_run['dump']))[0]['pred_instances']
    loaded = _first_prediction(tmp_path / 'loaded', checkpoint=str(demo_run['checkpoint']))
    unloaded = _first_prediction(tmp_path / 'unloaded', checkpoint=None)
    assert _same_prediction(first, loaded), (first['scores'][:5], loaded.scores[:5])
    assert not _same_prediction(first, unloaded), 'the check cannot tell a missed checkpoint'


def _first_prediction(work_dir, checkpoint):
    """The demo detector's prediction for the first test image, in this
    process: with ``checkpoint`` loaded, or initialized as training starts."""
    cfg = load_config(DEMO, work_dir=str(work_dir))
    cfg.load_from = checkpoint
    runner = build_runner(cfg)
    if checkpoint:
        runner.load_or_resume()
    else:
        runner.model.init_weights()
    runner.model.eval()
    data = next(iter(runner.build_dataloader(cfg.test_dataloader)))
    with torch.no_grad():
        return runner.model.test_step(data)[0].pred_instances


def _same_prediction(dumped: dict, instances) -> bool:
    scores = torch.as_tensor(dumped['scores'])
    return (len(scores) == len(instances.scores)
            and torch.allclose(scores, instances.scores.cpu(), atol=1e-4)
            and torch.allclose(torch.as_tensor(dumped['bboxes']), instances.bboxes.cpu(),
                               atol=1e-2))


# ------------------------------------------------------------- bad input
# `slow`: the message is checked in-process (tests/test_apis/test_launch.py); this is
# train.py's wiring end to end, a process importing the stack (about 20 s of a worker)
@pytest.mark.slow
def test_missing_data_root_names_the_path(tmp_path):
    missing = str(tmp_path / 'no_coco') + '/'
    result = _run(osp.join(REPO, 'tools', 'train.py'), DEMO, '--work-dir', str(tmp_path),
                  '--cfg-options', f'train_dataloader.dataset.data_root={missing}')
    assert result.returncode != 0
    assert 'FileNotFoundError' in result.stderr and missing in result.stderr
    # and says how to point at the data: the demo's own variable, not its base's COCO_ROOT
    assert 'COCO_TINY_ROOT=/path/to/data/' in result.stderr


@pytest.mark.parametrize('name', [DEMO, 'cascade_rcnn_convneur_m3_1x_coco.py'])
def test_data_root_without_trailing_slash_reaches_the_evaluator(name, coco_tiny, monkeypatch):
    root = coco_tiny.rstrip('/')
    for variable in ('COCO_ROOT', 'COCO_TINY_ROOT'):
        monkeypatch.setenv(variable, root)
    cfg = load_config(name if osp.isabs(name) else osp.join(REPO, 'configs', name))
    evaluator = cfg.test_evaluator
    assert evaluator.ann_file == root + '/annotations/instances_val2017.json'
    if name == DEMO:  # the tiny set has what the demo names
        assert missing_data_paths(cfg, ['test_dataloader']) == []


def test_missing_evaluator_annotations_are_named_before_the_run(coco_tiny, tmp_path):
    cfg = load_config(DEMO, {'test_dataloader.dataset.data_root': coco_tiny,
                             'test_evaluator.ann_file': str(tmp_path / 'none.json')})
    missing = missing_data_paths(cfg, ['test_dataloader'])
    assert len(missing) == 1 and 'none.json' in missing[0] and 'evaluator' in missing[0]
    remote = load_config(DEMO, {'test_dataloader.dataset.data_root': 's3://bucket/coco/',
                                'test_evaluator.ann_file': 's3://bucket/coco/val.json'})
    assert missing_data_paths(remote, ['test_dataloader']) == []  # backend_args' business


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = str(tmp_path / 'epoch_12.pth')
    result = _run(osp.join(REPO, 'tools', 'test.py'), DEMO, missing)
    assert result.returncode != 0
    assert f'checkpoint not found: {missing}' in result.stderr
