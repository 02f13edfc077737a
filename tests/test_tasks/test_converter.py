"""From classification to dense prediction, end to end: train a tiny M3
classifier for two iterations, convert its checkpoint, load it strictly into
the detector and the segmentor, and compare every tensor."""
import contextlib
import hashlib
import logging
import os.path as osp
import subprocess
import sys
from typing import Iterator, List

import pytest
import torch
from mmengine.logging import MMLogger
from mmengine.runner.checkpoint import _load_checkpoint

from convneur_mm.demo_data.imagenet import generate_imagenet_tiny
from convneur_mm.apis.launch import build_runner
from convneur_mm.models.backbones.convneur import ConvNeur
from convneur_mm.utils.paths import tools_dir
from ..paths import import_file
from convneur_mm.models.utils.pretrained import CheckpointMismatchError
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model
from .test_classification import one_thread, tiny_cls_cfg  # noqa: F401 (autouse fixture)

CONVERTER = osp.join(tools_dir(), 'model_converters', 'cls_to_backbone.py')
DENSE_M3 = ('cascade_rcnn_convneur_m3_1x_coco.py', 'fpn_convneur_m3_80k_ade20k.py')
NEW_NORMS = [f'norm{i}.{p}' for i in range(3) for p in ('bias', 'weight')]


converter = import_file('cls_to_backbone', CONVERTER)


@pytest.fixture(scope='module')
def classifier_checkpoint(tmp_path_factory) -> str:
    """A real Runner checkpoint of an M3 ImageClassifier after two AdamW steps."""
    data_root = str(tmp_path_factory.mktemp('imagenet_tiny'))
    generate_imagenet_tiny(data_root, train_per_class=1, val_per_class=1)
    work_dir = str(tmp_path_factory.mktemp('cls_m3'))
    cfg = tiny_cls_cfg(data_root, work_dir, **{
        'model.backbone.arch': 'm3', 'model.head.in_channels': 512,
        'optim_wrapper.optimizer.lr': 1e-3, 'param_scheduler': None,
        'train_dataloader.batch_size': 5, 'train_cfg.max_epochs': 1,
        'val_cfg': None, 'val_dataloader': None, 'val_evaluator': None,
        'default_hooks.checkpoint.interval': 1})
    build_runner(cfg).train()
    return osp.join(work_dir, 'epoch_1.pth')


@pytest.fixture(scope='module')
def classifier_state(classifier_checkpoint) -> dict:
    return _load_checkpoint(classifier_checkpoint, map_location='cpu')['state_dict']


@pytest.fixture(scope='module')
def converted(classifier_checkpoint, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp('converted') / 'convneur_m3_backbone.pth')
    converter.convert_file(classifier_checkpoint, out)
    return out


def test_output_is_self_describing(converted, classifier_checkpoint, classifier_state):
    checkpoint = _load_checkpoint(converted, map_location='cpu')  # weights-only loader
    meta, state = checkpoint['meta'], checkpoint['state_dict']
    assert meta['backbone'] == dict(type='convneur_mm.ConvNeur', arch='m3',
                                    memory_placement='stage', out_indices=(0, 1, 2, 3),
                                    gap_before_final_norm=False)
    assert meta['source'] == classifier_checkpoint
    with open(classifier_checkpoint, 'rb') as f:
        assert meta['source_sha256'] == hashlib.sha256(f.read()).hexdigest()
    assert meta['source_meta']['iter'] == 2 and meta['source_meta']['epoch'] == 1
    assert meta['initialized_keys'] == ['backbone.' + k for k in NEW_NORMS]
    assert meta['dropped_keys'] == ['head.fc.bias', 'head.fc.weight']
    assert all(k.startswith('backbone.') for k in state)
    assert meta['copied_keys'] == len(state) - 6 == len(classifier_state) - 2
    for key, value in classifier_state.items():
        if key.startswith('backbone.'):
            assert torch.equal(state[key], value), key
    # the classifier really trained: its final norm moved away from its init
    assert not torch.equal(state['backbone.norm3.weight'], torch.ones(512))


@pytest.mark.parametrize('name', DENSE_M3)
def test_detector_and_segmentor_load_every_tensor(name, converted, classifier_state,
                                                  monkeypatch):
    monkeypatch.setenv('CONVNEUR_PRETRAINED', converted)  # the configs' documented switch
    cfg = load_config(name)
    assert cfg.model.backbone.init_cfg.checkpoint == converted
    # other memory settings than classification's (chunk 196, step 1): weights still fit
    assert cfg.model.backbone.memory_cfg != dict(chunk_size=196, max_lr=1.0)
    model = build_model(cfg)  # init_weights: the strict loader raises on any mismatch
    fresh = ConvNeur('m3', out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
    fresh.init_weights()
    own = model.backbone.state_dict()
    copied = [k for k in own if 'backbone.' + k in classifier_state]
    assert sorted(set(own) - set(copied)) == NEW_NORMS
    for key in copied:
        assert torch.equal(own[key], classifier_state['backbone.' + key]), key
    for key in NEW_NORMS:  # exactly what ConvNeur's own init gives them
        assert torch.equal(own[key], fresh.state_dict()[key]), key
    with torch.no_grad():
        feats = model.backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    assert all(torch.isfinite(f).all() for f in feats)


def _dense_backbone(arch: str, checkpoint: str, **init) -> ConvNeur:
    return ConvNeur(arch, out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
                    init_cfg=dict(type='Pretrained', checkpoint=checkpoint,
                                  prefix='backbone.', **init))


@contextlib.contextmanager
def warnings_logged() -> Iterator[List[str]]:
    """The warnings that MMEngine's current logger receives meanwhile."""
    messages: List[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_loader_is_loud_about_unconverted_and_wrong_arch(classifier_checkpoint, converted,
                                                         classifier_state):
    with pytest.raises(CheckpointMismatchError) as err:
        _dense_backbone('m3', classifier_checkpoint).init_weights()
    message = str(err.value)
    assert '6 missing keys' in message and 'norm0.weight' in message
    assert 'cls_to_backbone.py' in message  # says how to fix it
    with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
        _dense_backbone('m2', converted).init_weights()
    # strict=False loads what fits, with a warning that names what does not
    backbone = _dense_backbone('m3', classifier_checkpoint, strict=False)
    with warnings_logged() as warnings:
        backbone.init_weights()
    assert len(warnings) == 1 and '6 missing keys: norm0.bias, norm0.weight' in warnings[0]
    assert torch.equal(backbone.norm3.weight, classifier_state['backbone.norm3.weight'])


def test_list_form_pretrained_init_cfg_loads_strictly(converted, tmp_path):
    """init_cfg=[dict(type='Pretrained', ...)] takes the strict loader too, and
    the memories' own init does not overwrite what it loaded."""
    state = torch.load(converted, map_location='cpu', weights_only=False)['state_dict']
    backbone = ConvNeur('m3', out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
                        init_cfg=[dict(type='Pretrained', checkpoint=converted,
                                       prefix='backbone.')])
    backbone.init_weights()
    own = backbone.state_dict()
    assert all(torch.equal(own[k], state['backbone.' + k]) for k in own)
    with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
        ConvNeur('m2', out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
                 init_cfg=[dict(type='Pretrained', checkpoint=converted,
                                prefix='backbone.')]).init_weights()


def test_a_dense_checkpoint_loads_strictly_into_fewer_out_indices(converted):
    """A backbone with fewer outputs has no place for the other stages'
    output norms: they are left out; every other key is still checked."""
    state = torch.load(converted, map_location='cpu', weights_only=False)['state_dict']
    backbone = ConvNeur('m3', out_indices=(1, 3), gap_before_final_norm=False,
                        init_cfg=dict(type='Pretrained', checkpoint=converted,
                                      prefix='backbone.'))
    backbone.init_weights()
    own = backbone.state_dict()
    assert 'norm0.weight' not in own and 'norm1.weight' in own
    assert all(torch.equal(own[k], state['backbone.' + k]) for k in own)


def test_non_strict_load_gives_missing_tensors_the_documented_init(converted, tmp_path):
    checkpoint = torch.load(converted, map_location='cpu', weights_only=False)
    for name in ('weight', 'bias'):
        del checkpoint['state_dict'][f'backbone.stages.0.0.global_branch.proj_in.{name}']
    partial = str(tmp_path / 'partial.pth')
    torch.save(checkpoint, partial)
    torch.manual_seed(0)
    backbone = _dense_backbone('m3', partial, strict=False)
    backbone.init_weights()
    # TruncNormal(std 0.02), bias 0; PyTorch's default would be uniform
    # with std 1/sqrt(3 * 64) = 0.072 and a non-zero bias
    proj = backbone.stages[0][0].global_branch.proj_in
    assert 0.015 < float(proj.weight.std()) < 0.025
    assert not proj.bias.any()


@pytest.mark.parametrize('case, why', [
    ('resnet', 'backbone is not a ConvNeur'),
    ('detector', 'weights of a detector or segmentor'),
    ('converted', 'already the output'),
    ('no_head', 'no classification head'),
    ('wrong_shape', 'does not match'),
    ('missing_block', 'missing keys'),
    ('no_backbone', "no key starts with 'backbone.'"),
])
def test_converter_refuses_what_is_not_a_convneur_classifier(case, why, classifier_state,
                                                             converted):
    state = dict(classifier_state)
    t = torch.zeros(2)
    if case == 'resnet':
        state = {'backbone.conv1.weight': t, 'backbone.layer1.0.conv1.weight': t,
                 'head.fc.weight': t}
    elif case == 'detector':
        state['neck.lateral_convs.0.conv.weight'] = t
    elif case == 'no_head':
        state = {k: v for k, v in state.items() if not k.startswith('head.')}
    elif case == 'wrong_shape':
        state['backbone.stages.1.1.local_branch.pwconv1.weight'] = torch.zeros(3, 3)
    elif case == 'missing_block':
        del state['backbone.stages.2.3.local_branch.dwconv.weight']
    elif case == 'no_backbone':
        state = {'encoder.weight': t, 'head.fc.weight': t}
    checkpoint = (_load_checkpoint(converted, map_location='cpu') if case == 'converted'
                  else dict(meta=dict(epoch=1), state_dict=state))
    with pytest.raises(converter.NotConvNeurClassifierError, match=why):
        converter.convert(checkpoint)


def test_cli(classifier_checkpoint, tmp_path):
    out = tmp_path / 'backbone.pth'
    done = subprocess.run([sys.executable, CONVERTER, classifier_checkpoint, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'arch M3' in done.stdout and 'NOT pretrained' in done.stdout
    assert 'backbone.norm0.weight' in done.stdout and out.is_file()
    # refusals end the CLI with the reason, not a traceback, and write nothing
    bogus = tmp_path / 'notes.txt'
    bogus.write_text('not a checkpoint')
    with pytest.raises(SystemExit) as exit_info:
        converter.main([str(bogus), str(tmp_path / 'x.pth')])
    assert str(exit_info.value).startswith(f'error: {bogus} is not a ConvNeur classification '
                                           'checkpoint: it cannot be read as a checkpoint')
    assert not (tmp_path / 'x.pth').exists()
