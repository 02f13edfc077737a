"""configs/ablations/: one config per Table 5 row, each ConvNeur-M3's with only
the row's switch changed; and a row under a training recipe."""
import os.path as osp

import pytest

from convneur_mm.analysis.ablations import (_literal_table5, ablation_configs, apply_recipe,
                                         row_meta)
from convneur_mm.apis.launch import load_config

BASE = 'cls_convneur_m3_300e_in1k.py'
RECIPE = 'demo/cls_convneur_m1_imagenet_tiny.py'
# config -> its switch, as the row names it
SWITCHES = {
    'local_only': dict(memory_placement='none'), 'ours': {},
    'per_layer': dict(memory_placement='block'), 'cbam': dict(global_mixer='cbam'),
    'nonlocal': dict(global_mixer='nonlocal'), 'self_attention': dict(global_mixer='attention'),
    'ir_rwkv': dict(global_mixer='rwkv'), 'titans': dict(global_mixer='titans'),
    'fusion_add': dict(fusion='add'), 'fusion_concat': dict(fusion='concat'),
    'cm64': dict(memory_cfg=dict(dim=64)), 'cm256': dict(memory_cfg=dict(dim=256))}


@pytest.fixture(scope='module')
def base():
    return load_config(BASE).to_dict()


def _row(path):
    return osp.basename(path)[len('cls_convneur_m3_'):-len('_300e_in1k.py')]


def test_one_config_per_row_in_the_papers_order():
    rows = [_row(p) for p in ablation_configs()]
    assert rows == list(SWITCHES)
    metas = [_literal_table5(p) for p in ablation_configs()]
    assert [m['paper_gflops'] for m in metas] == [1.4, 1.8, 2.3, 1.5, 3.0, 1.8, 2.0, 3.1,
                                                 1.8, 1.9, 1.5, 2.7]
    assert [m['paper_top1'] for m in metas] == [78.2, 80.0, 80.4, 78.4, 79.1, 79.8, 77.6, 79.6,
                                               79.6, 79.5, 78.6, 80.3]


@pytest.mark.parametrize('path', ablation_configs(), ids=_row)
def test_each_row_changes_only_its_switch(path, base):
    base, row = dict(base, model=dict(base['model'])), load_config(path).to_dict()
    assert row.pop('table5') == _literal_table5(path)
    assert row.pop('work_dir') == f'./work_dirs/{osp.splitext(osp.basename(path))[0]}'
    base.pop('work_dir')  # each config's own default, named after its file
    row_backbone, base_backbone = row['model'].pop('backbone'), base['model'].pop('backbone')
    assert row == base  # data, schedule, head, runtime: M3's
    switch = SWITCHES[_row(path)]
    expected = dict(base_backbone, **{k: v for k, v in switch.items() if k != 'memory_cfg'})
    expected['memory_cfg'] = dict(base_backbone['memory_cfg'], **switch.get('memory_cfg', {}))
    assert row_backbone == expected


def test_a_row_under_a_recipe_keeps_the_recipe_and_takes_the_backbone():
    row = load_config(osp.join('ablations', 'cls_convneur_m3_nonlocal_300e_in1k.py'))
    recipe = load_config(RECIPE)
    merged = apply_recipe(row, recipe)
    assert merged.model.backbone == row.model.backbone
    assert merged.model.head.in_channels == 512 and merged.model.head.num_classes == 10
    for key in ('train_dataloader', 'optim_wrapper', 'param_scheduler', 'train_cfg'):
        assert merged[key] == recipe[key], key
    assert merged.table5.method == 'Non-local [68]'

    recipe.backbone_overrides = dict(arch='m1', memory_cfg=dict(chunk_size=64))
    merged = apply_recipe(row, recipe)
    assert merged.model.backbone.global_mixer == 'nonlocal'  # the row's switch stays
    assert merged.model.backbone.arch == 'm1' and merged.model.head.in_channels == 320
    assert merged.model.backbone.memory_cfg == dict(chunk_size=64, max_lr=1.0)


def test_the_ablation_recipe_is_bounded_and_the_same_for_every_row():
    """The tool's default recipe: one process of 32 images, 4 epochs of the
    tiny set at 64x64, no batch augmentation, no stochastic depth, for every
    row; the rows' backbones still differ by their switch only."""
    recipe = load_config(osp.join('ablations', 'recipes', 'imagenet_tiny_m3.py'))
    merged = [apply_recipe(load_config(p), recipe) for p in ablation_configs()]
    for cfg in merged:
        assert cfg.train_cfg.max_epochs == 4 and cfg.train_dataloader.batch_size == 32
        assert not cfg.model.get('train_cfg')  # no Mixup / CutMix
        assert [p['type'] for p in cfg.train_dataloader.dataset.pipeline] == [
            'LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip', 'PackInputs']
        assert cfg.model.backbone.drop_path_rate == 0.0
        assert cfg.model.backbone.arch == 'm3' and cfg.randomness.seed == 0
    rows = {_row(p): cfg.model.backbone for p, cfg in zip(ablation_configs(), merged)}
    ours = rows['ours']
    for name, backbone in rows.items():
        switch = SWITCHES[name]
        expected = dict(ours, **{k: v for k, v in switch.items() if k != 'memory_cfg'})
        expected['memory_cfg'] = dict(ours['memory_cfg'], **switch.get('memory_cfg', {}))
        assert backbone == expected, name
