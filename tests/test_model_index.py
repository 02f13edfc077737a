"""model-index.yml and its metafiles, and MMPretrain's model hub.

The files are checked with the `model-index` package (the OpenMMLab format
and what MIM and MMPretrain parse them with), against the configs, the
paper's tables and our own parameter / FLOP counts. The classifiers must work
through MMPretrain's own entry points: list_models, get_model, inference_model.
"""
import glob
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
from modelindex.load_model_index import load

from convneur_mm.model_index import NoPretrainedWeightsError
from convneur_mm.analysis.complexity import measure_config

from .paths import REPO

METAFILES = ('in1k', 'coco', 'ade20k')
CLASSIFIERS = [f'convneur-{arch}_8xb512_in1k' for arch in ('m1', 'm2', 'm3', 'm4')]
# the paper's Tables 2, 3 and 4, transcribed (configs/metafiles quote them)
PAPER = {
    'cls_convneur_m1_300e_in1k.py': {'Top 1 Accuracy': 75.4},
    'cls_convneur_m2_300e_in1k.py': {'Top 1 Accuracy': 77.6},
    'cls_convneur_m3_300e_in1k.py': {'Top 1 Accuracy': 80.0},
    'cls_convneur_m4_300e_in1k.py': {'Top 1 Accuracy': 81.5},
    'cascade_rcnn_convneur_m2_1x_coco.py': {
        'box AP': 41.2, 'box AP50': 60.9, 'box AP75': 44.5,
        'mask AP': 36.4, 'mask AP50': 57.7, 'mask AP75': 38.6},
    'cascade_rcnn_convneur_m3_1x_coco.py': {
        'box AP': 42.4, 'box AP50': 64.8, 'box AP75': 46.1,
        'mask AP': 39.0, 'mask AP50': 61.0, 'mask AP75': 41.8},
    'fpn_convneur_m2_80k_ade20k.py': {'mIoU': 39.17, 'mAcc': 49.85},
    'fpn_convneur_m3_80k_ade20k.py': {'mIoU': 41.42, 'mAcc': 52.35},
    'upernet_convneur_m4_80k_ade20k.py': {'mIoU': 45.72, 'mAcc': 57.61},
}
TASKS = {'in1k': {'Image Classification'}, 'coco': {'Object Detection', 'Instance Segmentation'},
         'ade20k': {'Semantic Segmentation'}}


@pytest.fixture(scope='module')
def index():
    model_index = load(osp.join(REPO, 'model-index.yml'))
    model_index.build_models_with_collections()
    return model_index


def _config(model) -> str:
    return osp.basename(model.config)


def test_files_pass_the_model_index_check(index):
    assert index.check(silent=True) == []
    assert {osp.basename(m.filepath) for m in index.models} == {f'{n}.yml' for n in METAFILES}


def test_every_config_has_exactly_one_model(index):
    configs = sorted(osp.basename(p) for p in glob.glob(osp.join(REPO, 'configs', '*.py')))
    assert sorted(_config(m) for m in index.models) == configs
    names = [m.name for m in index.models]
    assert len(set(names)) == len(names)
    for model in index.models:
        assert osp.isfile(osp.join(REPO, model.config)), model.config
        assert model.in_collection in [c.name for c in index.collections]


def test_one_task_per_metafile_and_the_papers_results(index):
    for model in index.models:
        metafile = osp.splitext(osp.basename(model.filepath))[0]
        expected = PAPER.get(_config(model))
        metadata = model.full_model.metadata.data
        assert model.weights is None, f'{model.name}: no weights exist'
        assert model.full_model.paper['Title'] == 'Efficiency Follows Global-Local Decoupling'
        if expected is None:  # UperNet M2 / M3: not in the paper
            assert model.results is None and metadata['Results Source'].startswith('none')
            continue
        assert metadata['Results Source'].startswith('paper Table')
        assert {r.task for r in model.results} <= TASKS[metafile]
        assert {r.dataset for r in model.results} == {
            'in1k': {'ImageNet-1k'}, 'coco': {'COCO'}, 'ade20k': {'ADE20K'}}[metafile]
        metrics = {k: v for r in model.results for k, v in r.metrics.items()}
        assert metrics == expected, model.name


@pytest.mark.parametrize('name', CLASSIFIERS)
def test_classifier_params_and_flops_are_get_flops(index, name):
    model = next(m for m in index.models if m.name == name)
    measured = measure_config(_config(model))
    metadata = model.metadata.data
    assert measured['shape'] == (224, 224) and metadata['Resolution'] == '224x224'
    assert metadata['Parameters'] == measured['whole']['params']
    assert metadata['FLOPs'] == measured['whole']['paper']
    assert metadata['Full FLOPs'] == measured['whole']['full']


# ----------------------------------------------------------- MMPretrain's hub
def test_importing_convneur_mm_registers_lazily_in_either_order():
    """Before MMPretrain is imported (convneur_mm imports no toolbox) and after."""
    before = ('import sys, convneur_mm; assert "mmpretrain" not in sys.modules; '
              'from mmpretrain import list_models; print(list_models("convneur*"))')
    after = ('from mmpretrain import list_models; import convneur_mm; '
             'print(list_models("convneur*"))')
    for code in (before, after):
        result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == str(CLASSIFIERS)


@pytest.fixture(scope='module')
def hub():
    import mmpretrain
    return mmpretrain


def test_get_model_by_name_builds_the_config(hub):
    model = hub.get_model('convneur-m2_8xb512_in1k')
    assert type(model).__name__ == 'ImageClassifier'
    assert type(model.backbone).__name__ == 'ConvNeur'
    assert model.backbone.dims == [48, 96, 192, 384]
    assert model._metainfo.name == 'convneur-m2_8xb512_in1k'
    assert osp.samefile(model._config.filename,
                        osp.join(REPO, 'configs', 'cls_convneur_m2_300e_in1k.py'))


def test_inference_model_classifies_with_a_hub_model(hub):
    image = (np.random.RandomState(0).rand(240, 320, 3) * 255).astype(np.uint8)
    model = hub.get_model('convneur-m1_8xb512_in1k')
    result = hub.inference_model(model, image)  # the failing call
    assert result['pred_scores'].shape == (1000,)
    assert 0 <= result['pred_label'] < 1000
    assert result['pred_score'] == pytest.approx(float(result['pred_scores'].max()))
    assert isinstance(result['pred_class'], str)  # ImageNet's class names
    by_name = hub.inference_model('convneur-m1_8xb512_in1k', image, pretrained=False)
    assert by_name['pred_scores'].shape == (1000,)


def test_pretrained_weights_are_refused_clearly(hub):
    with pytest.raises(NoPretrainedWeightsError, match='no pretrained weights exist'):
        hub.get_model('convneur-m1_8xb512_in1k', pretrained=True)
    # the inferencers default to pretrained=True
    with pytest.raises(NoPretrainedWeightsError, match='convneur-m3_8xb512_in1k'):
        hub.ImageClassificationInferencer('convneur-m3_8xb512_in1k')
    # the refusal is for our names only: other checkpoints load as before
    from mmengine.runner import CheckpointLoader
    assert CheckpointLoader._get_checkpoint_loader('work_dirs/x.pth').__name__ != \
        'load_from_no_weights'
