"""The toolboxes' inference APIs on our configs and checkpoints, in a
process that never imports convneur_mm itself (as a user's script does).

MMEngine's inferencers (``DetInferencer``, ``MMSegInferencer``,
``ImageClassificationInferencer``) read the weights before they build the
model; torch's weights-only load refuses what MMEngine's runner writes into a
checkpoint (its message hub's ``HistoryBuffer``) unless convneur_mm's
allow-list is in place. Every config imports convneur_mm (``custom_imports``)."""
import glob
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.runner.checkpoint import weights_to_cpu

from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model
from ..paths import REPO

CONFIGS = sorted(p for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
                 if '/metafiles/' not in p)
DEMOS = {'det': 'demo/cascade_rcnn_convneur_m3_coco_tiny.py',
         'seg': 'demo/fpn_convneur_m2_ade20k_tiny.py',
         'cls': 'demo/cls_convneur_m1_imagenet_tiny.py'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: osp.relpath(p, REPO))
def test_every_config_imports_convneur_mm(path):
    cfg = Config.fromfile(path, import_custom_modules=False)
    assert 'convneur_mm' in cfg.custom_imports['imports']
    assert cfg.custom_imports.get('allow_failed_imports') is False


def _runner_like_checkpoint(config: str, path: str) -> None:
    """Weights plus what MMEngine's runner puts beside them (the message hub's
    history buffers, meta)."""
    model = build_model(load_config(config), init=False)
    hub = MessageHub.get_instance('inferencer_test')
    hub.update_scalar('train/loss', 1.0)
    torch.save(dict(meta=dict(epoch=1, iter=8), state_dict=weights_to_cpu(model.state_dict()),
                    message_hub=hub.state_dict()), path)


INFER = '''
import sys
import numpy as np
kind, config, checkpoint = sys.argv[1:]
image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
if kind == 'det':
    from mmdet.apis import DetInferencer
    result = DetInferencer(model=config, weights=checkpoint, device='cpu')(image)
    assert len(result['predictions'][0]['bboxes']) >= 0
elif kind == 'seg':
    from mmseg.apis import MMSegInferencer
    result = MMSegInferencer(model=config, weights=checkpoint, device='cpu')(image)
    assert result['predictions'].shape == (96, 128)
else:
    from mmpretrain.apis import ImageClassificationInferencer
    result = ImageClassificationInferencer(model=config, pretrained=checkpoint, device='cpu')(image)
    assert 0 <= result[0]['pred_label'] < 10
assert 'convneur_mm' in sys.modules  # through the config's custom_imports
print('inferred', kind)
'''


# the segmentor's and the classifier's cases are `slow` tests: the detector's covers the path
@pytest.mark.parametrize('kind', [pytest.param(k, marks=pytest.mark.slow) if k != 'det' else k
                                  for k in DEMOS])
def test_inferencers_read_our_checkpoints_in_a_fresh_process(kind, tmp_path):
    config = osp.join(REPO, 'configs', DEMOS[kind])
    checkpoint = str(tmp_path / 'epoch_1.pth')
    _runner_like_checkpoint(DEMOS[kind], checkpoint)
    result = subprocess.run([sys.executable, '-c', INFER, kind, config, checkpoint],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'inferred {kind}' in result.stdout
