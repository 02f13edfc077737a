"""Other projects inherit our configs from the installed wheel.

MMEngine's ``package::path`` bases accept only OpenMMLab's own package names,
so a user's config names ours through an environment variable::

    export CONVNEUR_CONFIGS=$(python -m convneur_mm configs)
    # my_config.py
    _base_ = ['{{$CONVNEUR_CONFIGS:}}/fpn_convneur_m2_80k_ade20k.py']

Tested the way a user meets it: a directory outside the repository, the wheel
installed with ``pip --target`` (so the repository's editable install is not
what runs), our configs' own ``./`` and ``mmseg::`` / ``mmdet::`` bases read
from the wheel's ``.mim/configs``, and the wheel's own ``tools/train.py``.
"""
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
import textwrap

import pytest

from convneur_mm.demo_data.ade20k import generate_ade20k_tiny

SEG_CHILD = '''
_base_ = ['{{$CONVNEUR_CONFIGS:}}/fpn_convneur_m2_80k_ade20k.py']

# my dataset: small images in the ADE20K layout
data_root = %(data_root)r
crop_size = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(256, 64), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
loader = dict(num_workers=0, persistent_workers=False)
train_dataloader = dict(batch_size=2, **loader,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(**loader, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

# my decode head: a slimmer Semantic FPN head
model = dict(data_preprocessor=dict(size=crop_size),
             decode_head=dict(channels=64, dropout_ratio=0.0))

# my schedule
train_cfg = dict(max_iters=2, val_interval=2)
param_scheduler = [dict(type='PolyLR', power=1.0, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
'''

DET_CHILD = '''
_base_ = ['{{$CONVNEUR_CONFIGS:}}/cascade_rcnn_convneur_m3_1x_coco.py']

# the smaller backbone, my data and a shorter schedule
model = dict(backbone=dict(arch='m2', drop_path_rate=0.0),
             neck=dict(in_channels=[48, 96, 192, 384]))
data_root = 'data/my_coco/'
train_dataloader = dict(dataset=dict(data_root=data_root))
train_cfg = dict(max_epochs=2)
optim_wrapper = dict(optimizer=dict(lr=0.01))
'''

CHECK = '''
import json, os, sys
import convneur_mm
from mmengine.config import Config
from convneur_mm.utils.paths import config_dir
from convneur_mm.apis.toolbox import build_model

seg, det = Config.fromfile('seg_child.py'), Config.fromfile('det_child.py')
seg_model, det_model = build_model(seg, init=False), build_model(det, init=False)
try:  # without the variable, MMEngine names it
    del os.environ['CONVNEUR_CONFIGS']
    Config.fromfile('seg_child.py')
    unset_error = ''
except KeyError as err:
    unset_error = str(err)
print(json.dumps(dict(
    package=convneur_mm.__file__, configs=config_dir(),
    seg=[type(seg_model).__name__, seg_model.backbone.dims, seg.model.backbone.memory_cfg,
         type(seg_model.decode_head).__name__, seg_model.decode_head.channels,
         seg_model.neck.lateral_convs[0].conv.in_channels, seg.train_dataloader.batch_size,
         seg.optim_wrapper.optimizer.lr],
    det=[type(det_model).__name__, det_model.backbone.dims,
         det_model.neck.lateral_convs[0].conv.in_channels, det.train_cfg.max_epochs,
         det.optim_wrapper.optimizer.lr, det.train_dataloader.dataset.data_root,
         det.model.backbone.memory_cfg],
    unset_error=unset_error)))
'''


@pytest.fixture(scope='module')
def installed(installed_wheel, tmp_path_factory) -> dict:
    """The wheel installed into a fresh directory, and a user's project beside it."""
    root = tmp_path_factory.mktemp('inherit')
    site, project = installed_wheel, root / 'project'
    data_root = str(root / 'my_ade')
    generate_ade20k_tiny(data_root, num_train=4, num_val=2)
    project.mkdir()
    (project / 'seg_child.py').write_text(SEG_CHILD % dict(data_root=data_root))
    (project / 'det_child.py').write_text(DET_CHILD)
    (project / 'check.py').write_text(textwrap.dedent(CHECK))
    # only the wheel: neither the repository nor a CONVNEUR_CONFIGS of this process
    env = {k: v for k, v in os.environ.items() if k not in ('CONVNEUR_CONFIGS', 'PYTHONPATH')}
    env['PYTHONPATH'] = str(site)
    return dict(site=str(site), project=str(project), env=env)


def _run(command: str, installed: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(['bash', '-c', command], cwd=installed['project'],
                            env=installed['env'], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_child_configs_inherit_from_the_installed_wheel(installed):
    python = shlex.quote(sys.executable)
    result = _run(f'export CONVNEUR_CONFIGS=$({python} -m convneur_mm configs) && '
                  f'{python} check.py', installed)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    site = installed['site']
    assert out['package'].startswith(site + os.sep), out['package']
    assert out['configs'] == osp.join(site, 'convneur_mm', '.mim', 'configs')
    # the base's own `./fpn_convneur_m3...` and `mmseg::` bases, plus our overrides
    memory_cfg = dict(chunk_size=1024, max_lr=0.2)
    assert out['seg'] == ['EncoderDecoder', [48, 96, 192, 384], memory_cfg, 'FPNHead', 64,
                          48, 2, 6e-5]
    assert out['det'] == ['CascadeRCNN', [48, 96, 192, 384], 48, 2, 0.01, 'data/my_coco/',
                          dict(chunk_size=4096, max_lr=1e-3)]
    assert 'CONVNEUR_CONFIGS' in out['unset_error']


@pytest.mark.slow  # the child configs' training from the wheel is covered beside it
def test_child_config_trains_with_the_wheels_train_tool(installed):
    """tools/train.py exports CONVNEUR_CONFIGS itself when it is unset."""
    assert 'CONVNEUR_CONFIGS' not in installed['env']
    python = shlex.quote(sys.executable)
    result = _run(f'{python} "$({python} -m convneur_mm tools)/train.py" seg_child.py '
                  '--work-dir work', installed)
    log = result.stdout + result.stderr
    assert osp.join(installed['site'], 'convneur_mm', '.mim', 'configs') in log
    assert 'Iter(train) [2/2]' in log and 'mIoU' in log
    work = osp.join(installed['project'], 'work')
    assert osp.isfile(osp.join(work, 'iter_2.pth'))
