"""Semantic segmentation on ADE20K: the paper's recipe in our
configs, the tiny ADE20K, CPU training and inference with the real config, a
train-then-evaluate run through the tools, and Table 4's FLOPs."""
import glob
import os
import os.path as osp
import re
import subprocess
import sys

import cv2
import mmengine
import numpy as np
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS, init_default_scope
from torch import nn

from convneur_mm.demo_data.ade20k import CLASSES, OTHER, SCENE_FILE, generate_ade20k_tiny
from convneur_mm.apis.launch import build_runner, load_config
from convneur_mm.analysis.complexity import measure_config
from convneur_mm.apis.toolbox import build_model, dummy_batch, tensor_forward
from ..paths import REPO
from .task_utils import on_tiny_data, train_and_diff

DEMO = osp.join(REPO, 'configs', 'demo', 'fpn_convneur_m2_ade20k_tiny.py')
# config: (arch, backbone dims, modules trained with lr x10)
CONFIGS = {
    'fpn_convneur_m2_80k_ade20k.py': ('m2', [48, 96, 192, 384], {'neck', 'decode_head'}),
    'fpn_convneur_m3_80k_ade20k.py': ('m3', [64, 128, 256, 512], {'neck', 'decode_head'}),
    'upernet_convneur_m2_80k_ade20k.py':
        ('m2', [48, 96, 192, 384], {'decode_head', 'auxiliary_head'}),
    'upernet_convneur_m3_80k_ade20k.py':
        ('m3', [64, 128, 256, 512], {'decode_head', 'auxiliary_head'}),
    'upernet_convneur_m4_80k_ade20k.py':
        ('m4', [80, 160, 320, 640], {'decode_head', 'auxiliary_head'}),
}
# the paper's Table 4: GFLOPs (MACs, paper convention) at 512x2048
TABLE4 = {'fpn_convneur_m2_80k_ade20k.py': 106, 'fpn_convneur_m3_80k_ade20k.py': 123,
          'upernet_convneur_m4_80k_ade20k.py': 908}
BASE_LR = 6e-5


@pytest.fixture(scope='module')
def ade20k_tiny(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('ade20k_tiny'))
    generate_ade20k_tiny(root)
    return root


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_has_the_paper_recipe_and_builds(name):
    arch, dims, _ = CONFIGS[name]
    cfg = load_config(name)
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch) == ('convneur_mm.ConvNeur', arch)
    assert backbone.memory_cfg == dict(chunk_size=1024, max_lr=0.2)
    assert backbone.out_indices == (0, 1, 2, 3) and not backbone.gap_before_final_norm
    assert cfg.model.decode_head.num_classes == 150
    # data: long side 2048 / short side 512, 512x512 crops, 4 images per GPU
    train = cfg.train_dataloader
    assert train.batch_size == 4 and train.dataset.type == 'ADE20KDataset'
    steps = {t.type: t for t in train.dataset.pipeline}
    assert steps['RandomResize'].scale == (2048, 512)
    assert steps['RandomCrop'].crop_size == (512, 512)
    assert cfg.model.data_preprocessor.size == (512, 512)
    assert {t.type: t for t in cfg.test_dataloader.dataset.pipeline}['Resize'].scale == \
        (2048, 512)
    assert cfg.test_evaluator.type == 'IoUMetric'
    # AdamW 6e-5, betas (0.9, 0.999), wd 0.01, clipping at 1.0, 80k iterations
    optim = cfg.optim_wrapper
    assert optim.optimizer == dict(type='AdamW', lr=BASE_LR, betas=(0.9, 0.999),
                                   weight_decay=0.01)
    assert optim.clip_grad.max_norm == 1.0
    assert cfg.train_cfg.max_iters == 80000
    assert cfg.auto_scale_lr.base_batch_size == 16
    # the heads fit the backbone: a forward pass gives 150 class maps at stride 4
    model = build_model(cfg, init=False).eval()
    assert model.backbone.dims == dims
    with torch.no_grad():
        out = tensor_forward(model, dummy_batch(model, 'mmseg', (64, 96)))
    assert out.shape == (1, 150, 16, 24)


@pytest.mark.parametrize('name', ['fpn_convneur_m2_80k_ade20k.py',
                                  'upernet_convneur_m4_80k_ade20k.py'])
def test_lr_x10_applies_to_neck_and_heads_only(name):
    _, _, boosted = CONFIGS[name]
    cfg = load_config(name)
    model = build_model(cfg, init=False)
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
    tops = set()
    for param_name, param in model.named_parameters():
        group = group_of[id(param)]
        top = param_name.split('.')[0]
        tops.add(top)
        expected = BASE_LR * (10 if top in boosted else 1)
        assert group['lr'] == pytest.approx(expected), param_name
        assert group['weight_decay'] == 0.01, param_name
    assert tops == boosted | {'backbone'}


def test_schedule_is_linear_warmup_then_polynomial_decay():
    cfg = load_config('fpn_convneur_m2_80k_ade20k.py')
    optimizer = build_optim_wrapper(nn.Linear(2, 2), cfg.optim_wrapper)
    init_default_scope('mmseg')
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=optimizer))
                  for s in cfg.param_scheduler]
    lrs = []
    for _ in range(cfg.train_cfg.max_iters):
        lrs.append(optimizer.param_groups[0]['lr'])
        for scheduler in schedulers:
            scheduler.step()
    assert lrs[0] < BASE_LR * 1e-5
    assert lrs[750] == pytest.approx(BASE_LR / 2, rel=1e-3)  # linear warm-up
    assert lrs[1500] == pytest.approx(BASE_LR)
    assert lrs[1500 + 78500 // 2] == pytest.approx(BASE_LR / 2, rel=1e-3)  # poly, power 1
    assert lrs[-1] < BASE_LR * 1e-4
    assert all(a >= b for a, b in zip(lrs[1500:], lrs[1501:]))


@pytest.mark.parametrize('name', sorted(TABLE4))
def test_table4_flops_at_512x2048(name):
    paper = measure_config(name, (512, 2048))['whole']['paper'] / 1e9
    assert abs(paper - TABLE4[name]) / TABLE4[name] < 0.03, paper


# ------------------------------------------------------------ tiny ADE20K
def test_tiny_ade20k_loads_through_mmseg_ade20k_dataset(ade20k_tiny):
    from mmseg.datasets import ADE20KDataset
    init_default_scope('mmseg')
    names = ADE20KDataset.METAINFO['classes']
    for class_id, name in CLASSES.items():  # ids are ADE20K's: 1-based, 0 = other
        assert names[class_id - 1].strip() == name
    assert osp.isfile(osp.join(ade20k_tiny, SCENE_FILE))
    seen = set()
    for split, count in (('training', 64), ('validation', 16)):
        dataset = ADE20KDataset(
            data_root=ade20k_tiny,
            data_prefix=dict(img_path=f'images/{split}', seg_map_path=f'annotations/{split}'),
            pipeline=[dict(type='LoadImageFromFile'),
                      dict(type='LoadAnnotations', reduce_zero_label=True)])
        assert len(dataset) == count
        for index in range(0, count, 5):
            item = dataset[index]
            raw = cv2.imread(item['seg_map_path'], cv2.IMREAD_UNCHANGED)
            assert raw.dtype == np.uint8 and raw.ndim == 2
            assert raw.shape == item['img'].shape[:2]
            assert set(np.unique(raw)) <= set(CLASSES) | {OTHER}
            reduced = item['gt_seg_map']
            np.testing.assert_array_equal(reduced == 255, raw == OTHER)
            np.testing.assert_array_equal(reduced[raw > 0], raw[raw > 0] - 1)
            seen |= set(np.unique(raw).tolist())
    assert seen == set(CLASSES) | {OTHER}


def test_tiny_ade20k_is_deterministic(tmp_path):
    first = generate_ade20k_tiny(str(tmp_path / 'a'), num_train=3, num_val=1)
    second = generate_ade20k_tiny(str(tmp_path / 'b'), num_train=3, num_val=1, seed=0)
    other = generate_ade20k_tiny(str(tmp_path / 'c'), num_train=3, num_val=1, seed=1)

    def labels(paths):
        return [open(p.replace('images', 'annotations').replace('.jpg', '.png'), 'rb').read()
                for split in paths.values() for p in split]

    assert labels(first) == labels(second)
    assert labels(first) != labels(other)


def test_a_smaller_tiny_ade20k_replaces_a_larger_one_and_real_data_is_refused(tmp_path):
    """MMSegmentation lists a split's whole folder: a set written over a larger
    one would train on both. Files no run of the generator wrote are never
    removed; an interrupted run's are."""
    root = str(tmp_path / 'ade')
    generate_ade20k_tiny(root, num_train=3, num_val=2)
    again = generate_ade20k_tiny(root, num_train=1, num_val=1)
    for split, kind in (('training', 'images'), ('validation', 'annotations')):
        assert len(os.listdir(osp.join(root, kind, split))) == 1
    assert [osp.basename(p) for p in again['training']] == ['ADE_train_00000001.jpg']
    os.remove(osp.join(root, 'sceneCategories.txt'))  # a run stopped before its last file
    generate_ade20k_tiny(root, num_train=2, num_val=1)
    assert len(os.listdir(osp.join(root, 'images', 'training'))) == 2
    foreign = osp.join(root, 'images', 'training', 'mine.jpg')
    open(foreign, 'wb').close()
    with pytest.raises(FileExistsError, match='1 files that no earlier run'):
        generate_ade20k_tiny(root, num_train=1, num_val=1)
    assert osp.exists(foreign) and osp.exists(again['training'][0])
    # an ADE20K copy: its file names are the generator's, but not its marker
    real = tmp_path / 'ADEChallengeData2016' / 'images' / 'training'
    real.mkdir(parents=True)
    (real / 'ADE_train_00000001.jpg').write_bytes(b'a real image')
    with pytest.raises(FileExistsError, match='an ADE20K copy'):
        generate_ade20k_tiny(str(tmp_path / 'ADEChallengeData2016'), num_train=1, num_val=1)
    assert (real / 'ADE_train_00000001.jpg').read_bytes() == b'a real image'


# --------------------------------------------------- training on the CPU
def test_real_config_trains_one_iteration_and_infers_on_cpu(ade20k_tiny, tmp_path):
    """The real S-FPN config (512 crops, SyncBN heads) in one CPU process."""
    cfg = load_config(osp.join(REPO, 'configs', 'fpn_convneur_m2_80k_ade20k.py'),
                      work_dir=str(tmp_path))
    on_tiny_data(cfg, ade20k_tiny)
    cfg.train_dataloader.batch_size = 1
    cfg.train_cfg.update(max_iters=1, val_interval=1, val_begin=2)
    cfg.default_hooks.checkpoint = None
    runner, changed = train_and_diff(cfg)
    model = runner.model
    assert not any('SyncBatchNorm' in type(m).__name__ for m in model.modules())
    assert runner.message_hub.get_scalar('train/loss').current() > 0
    assert {'backbone', 'neck', 'decode_head'} <= changed

    model.eval()
    data = next(iter(runner.build_dataloader(cfg.test_dataloader)))
    with torch.no_grad():
        pred = model.test_step(data)[0]
    assert pred.pred_sem_seg.data.shape[-2:] == tuple(pred.ori_shape)
    assert 0 <= int(pred.pred_sem_seg.data.min()) <= int(pred.pred_sem_seg.data.max()) < 150


def _metrics(stdout: str) -> dict:
    """The metric rows of tools/test.py's Markdown table."""
    return {k: float(v) for k, v in re.findall(r'^\| (\w+) \| ([\d.]+) \|$', stdout, re.M)}


ITERS = 20
VAL_SUBSET = 'test_dataloader.dataset.indices=8'  # the first 8 validation images


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope='module')
def demo_checkpoint(ade20k_tiny, tmp_path_factory) -> str:
    """tools/train.py on the demo config, 20 iterations: the checkpoint the
    evaluation tests below share."""
    work_dir = tmp_path_factory.mktemp('demo_train') / 'work'
    with pytest.MonkeyPatch.context() as env:
        env.setenv('ADE20K_TINY_ROOT', ade20k_tiny)
        train = _tool(osp.join(REPO, 'tools', 'train.py'), DEMO, '--work-dir', str(work_dir),
                      '--cfg-options', f'train_cfg.max_iters={ITERS}',
                      f'train_cfg.val_begin={ITERS + 1}',
                      f'default_hooks.checkpoint.interval={ITERS}',
                      'train_dataloader.batch_size=2')
    assert train.returncode == 0, train.stderr[-3000:]
    return str(work_dir / f'iter_{ITERS}.pth')


@pytest.fixture(scope='module')
def untrained_scores(ade20k_tiny, tmp_path_factory) -> dict:
    """The same model and evaluation, untrained (it scores about 0)."""
    from mmengine.registry import DefaultScope
    saved = DefaultScope._instance_dict.copy()  # as conftest's per-test restore does
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv('ADE20K_TINY_ROOT', ade20k_tiny)
            cfg = load_config(DEMO, {'test_dataloader.dataset.indices': 8},
                              work_dir=str(tmp_path_factory.mktemp('untrained')))
            runner = build_runner(cfg)
            runner.model.init_weights()
            return runner.test()
    finally:
        DefaultScope._instance_dict.clear()
        DefaultScope._instance_dict.update(saved)


def test_train_then_evaluate_learns(demo_checkpoint, untrained_scores, ade20k_tiny, tmp_path,
                                    monkeypatch):
    """tools/train.py on the demo config, then tools/test.py on its checkpoint:
    the table shows mIoU / mAcc / aAcc far above an untrained model's."""
    monkeypatch.setenv('ADE20K_TINY_ROOT', ade20k_tiny)
    dump = tmp_path / 'predictions.pkl'
    test = _tool(osp.join(REPO, 'tools', 'test.py'), DEMO, demo_checkpoint,
                 '--work-dir', str(tmp_path / 'test'), '--out', str(dump),
                 '--show-dir', str(tmp_path / 'drawn'), '--cfg-options', VAL_SUBSET)
    assert test.returncode == 0, test.stderr[-3000:]
    trained = _metrics(test.stdout)
    # --show-dir draws every image (MMSegmentation's hook alone: every 50th, none of 8)
    assert len(glob.glob(str(tmp_path / 'drawn' / '**' / '*.png'), recursive=True)) == 8
    assert {'mIoU', 'mAcc', 'aAcc'} <= set(trained), test.stdout[-2000:]
    # --out keeps label maps, not the 150-channel logits or the ground truth
    predictions = mmengine.load(str(dump))
    assert len(predictions) == 8 and os.path.getsize(dump) < 8 * 256 * 256 + 100_000
    for pred in predictions:
        assert 'seg_logits' not in pred and 'gt_sem_seg' not in pred
        assert pred['pred_sem_seg'].dtype == np.uint8
        assert pred['pred_sem_seg'].shape == tuple(pred['ori_shape'])
    untrained = untrained_scores
    assert trained['mIoU'] > untrained['mIoU'] + 20, (trained, untrained)
    assert trained['aAcc'] > untrained['aAcc'] + 40, (trained, untrained)


def test_a_checkpoint_that_does_not_fit_stops_the_evaluation(demo_checkpoint, ade20k_tiny,
                                                             tmp_path, monkeypatch):
    monkeypatch.setenv('ADE20K_TINY_ROOT', ade20k_tiny)
    mismatch = _tool(osp.join(REPO, 'tools', 'test.py'), DEMO, demo_checkpoint,
                     '--work-dir', str(tmp_path / 'mismatch'), '--cfg-options', VAL_SUBSET,
                     'model.backbone.arch=m1')
    assert mismatch.returncode != 0
    assert 'CheckpointMismatchError' in mismatch.stderr and 'shape mismatches' in mismatch.stderr
    assert not _metrics(mismatch.stdout)  # nothing evaluated


def test_a_load_from_whose_backbone_does_not_fit_stops_the_training(demo_checkpoint,
                                                                     ade20k_tiny, tmp_path,
                                                                     monkeypatch):
    """MMEngine loads load_from without strict and logs the mismatches: the
    global branches would train on from their initialization, silently."""
    monkeypatch.setenv('ADE20K_TINY_ROOT', ade20k_tiny)
    mismatch = _tool(osp.join(REPO, 'tools', 'train.py'), DEMO, '--work-dir',
                     str(tmp_path / 'mismatch'), '--cfg-options', f'load_from={demo_checkpoint}',
                     'model.backbone.memory_cfg.dim=64')
    assert mismatch.returncode != 0
    assert 'CheckpointMismatchError' in mismatch.stderr, mismatch.stderr[-3000:]
    assert 'does not fit the backbone of this config' in mismatch.stderr
    assert 'global_branch' in mismatch.stderr and "init_cfg" in mismatch.stderr
    assert 'Iter(train)' not in mismatch.stdout + mismatch.stderr  # nothing trained


# `slow`: a whole evaluation again, 12 passes an image (about 25 s of a worker)
@pytest.mark.slow
def test_tta_loads_the_checkpoint_into_the_tta_model(demo_checkpoint, untrained_scores,
                                                     ade20k_tiny, tmp_path, monkeypatch):
    """Test-time augmentation (6 scales x 2 flips, 12 forward passes an image:
    2 images): the checkpoint loads into the model inside SegTTAModel."""
    monkeypatch.setenv('ADE20K_TINY_ROOT', ade20k_tiny)
    tta = _tool(osp.join(REPO, 'tools', 'test.py'), DEMO, demo_checkpoint, '--tta',
                '--work-dir', str(tmp_path / 'tta'), '--cfg-options',
                'test_dataloader.dataset.indices=2')
    assert tta.returncode == 0, tta.stderr[-3000:]
    assert '--tta: SegTTAModel' in tta.stdout + tta.stderr
    augmented = _metrics(tta.stdout)
    untrained = untrained_scores
    assert augmented['mIoU'] > untrained['mIoU'] + 20, (augmented, untrained)
