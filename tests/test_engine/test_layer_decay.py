"""LayerDecayOptimWrapperConstructor: layer-wise learning-rate decay by the
backbone's depths in the detection, segmentation and classification configs,
on top of each config's own paramwise settings."""
import copy

import pytest
from mmengine.optim import build_optim_wrapper
from torch import nn

from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model

CONSTRUCTOR = 'convneur_mm.LayerDecayOptimWrapperConstructor'
CONFIGS = ['cascade_rcnn_convneur_m2_1x_coco.py', 'upernet_convneur_m2_80k_ade20k.py',
           'cls_convneur_m1_300e_in1k.py']


def _groups(model, optim_cfg):
    """{parameter name: its param group} of the optimizer the config builds."""
    optimizer = build_optim_wrapper(model, copy.deepcopy(optim_cfg)).optimizer
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: group for group in optimizer.param_groups for p in group['params']}


@pytest.fixture(scope='module', params=CONFIGS)
def model_and_cfg(request):
    cfg = load_config(request.param)
    return build_model(cfg, init=False), cfg.optim_wrapper


def test_decay_multiplies_the_configs_own_settings(model_and_cfg):
    model, optim_cfg = model_and_cfg
    rate = 0.5
    paramwise = dict(optim_cfg.get('paramwise_cfg') or {}, layer_decay_rate=rate)
    reference = _groups(model, dict(optim_cfg, paramwise_cfg=paramwise))  # MMEngine's own
    decayed = _groups(model, dict(optim_cfg, constructor=CONSTRUCTOR, paramwise_cfg=paramwise))
    base_lr = optim_cfg.optimizer.lr
    backbone = model.backbone
    num_layers = backbone.get_layer_depth('stages.0.0')[1]
    assert num_layers == sum(backbone.depths) + 2
    depths = {}
    for name, group in decayed.items():
        depth = backbone.get_layer_depth(name, 'backbone.')[0]
        depths[name] = depth
        assert group['lr'] == pytest.approx(
            reference[name].get('lr', base_lr) * rate**(num_layers - 1 - depth)), name
        assert group['weight_decay'] == reference[name]['weight_decay'], name
    stem = 'backbone.downsample_layers.0.0.weight'
    assert decayed[stem]['lr'] == pytest.approx(base_lr * rate**(num_layers - 1))
    assert depths['backbone.stages.1.1.local_branch.dwconv.weight'] == backbone.depths[0] + 2
    heads = [name for name in decayed if not name.startswith('backbone.')]
    assert heads and all(decayed[n]['lr'] == reference[n].get('lr', base_lr) for n in heads)
    if 'decode_head' in optim_cfg.get('paramwise_cfg', {}).get('custom_keys', {}):
        assert decayed['decode_head.conv_seg.weight']['lr'] == pytest.approx(10 * base_lr)


def test_rate_1_is_mmengines_default(model_and_cfg):
    model, optim_cfg = model_and_cfg
    paramwise = dict(optim_cfg.get('paramwise_cfg') or {}, layer_decay_rate=1.0)
    reference = _groups(model, dict(optim_cfg, paramwise_cfg=paramwise))
    ours = _groups(model, dict(optim_cfg, constructor=CONSTRUCTOR, paramwise_cfg=paramwise))
    for name, group in ours.items():
        assert group['lr'] == reference[name].get('lr', optim_cfg.optimizer.lr), name


def test_a_backbone_without_depths_is_a_clear_error():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(2, 2)

    with pytest.raises(TypeError, match='Model.backbone is Linear'):
        build_optim_wrapper(Model(), dict(optimizer=dict(type='SGD', lr=0.1),
                                          constructor=CONSTRUCTOR,
                                          paramwise_cfg=dict(layer_decay_rate=0.5)))


@pytest.mark.parametrize('config,theirs', [
    ('cascade_rcnn_convneur_m2_1x_coco.py', 'mmdet.LearningRateDecayOptimizerConstructor'),
    ('upernet_convneur_m2_80k_ade20k.py', 'mmseg.LearningRateDecayOptimizerConstructor')])
def test_the_toolboxes_own_constructors_know_convnext_only(config, theirs):
    """Why ours exists (docs/user_guides/train_and_test.md says so): theirs check the class name."""
    cfg = load_config(config)
    with pytest.raises(NotImplementedError):
        build_optim_wrapper(build_model(cfg, init=False), dict(
            cfg.optim_wrapper, constructor=theirs,
            paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=12)))


def test_an_optimizer_without_lr_and_paramwise_settings_without_the_rate():
    """lr from the optimizer's default; no rate: MMEngine's constructor as is."""
    model = nn.Module()
    model.backbone, model.head = nn.Linear(2, 2), nn.Linear(2, 2)
    model.backbone.get_layer_depth = lambda name, prefix: (
        (0, 3) if name.startswith(prefix) else (2, 3))
    optimizer = build_optim_wrapper(model, dict(
        optimizer=dict(type='Adam'), constructor=CONSTRUCTOR,
        paramwise_cfg=dict(layer_decay_rate=0.5))).optimizer
    assert [g['lr'] for g in optimizer.param_groups] == [2.5e-4] * 2 + [1e-3] * 2
    plain = nn.Module()
    plain.backbone = nn.Linear(2, 2)  # no depths, none asked for
    build_optim_wrapper(plain, dict(optimizer=dict(type='SGD', lr=0.1), constructor=CONSTRUCTOR,
                                    paramwise_cfg=dict(custom_keys={'bias': dict(lr_mult=2.0)})))


def test_a_tensor_learning_rate_is_scaled_per_group_not_shared():
    """torch keeps a tensor lr of the optimizer's defaults in every group
    without its own: scaled in place, it would compound over the groups."""
    import torch
    model = nn.Module()
    model.backbone, model.head = nn.Linear(2, 2), nn.Linear(2, 2)
    model.backbone.get_layer_depth = lambda name, prefix: (
        (0, 3) if name.startswith(prefix) else (2, 3))
    optimizer = build_optim_wrapper(model, dict(
        optimizer=dict(type='AdamW', lr=torch.tensor(1e-3)), constructor=CONSTRUCTOR,
        paramwise_cfg=dict(layer_decay_rate=0.5))).optimizer
    assert [float(g['lr']) for g in optimizer.param_groups] == pytest.approx(
        [2.5e-4] * 2 + [1e-3] * 2)
    assert float(optimizer.defaults['lr']) == pytest.approx(1e-3)
