"""The package skeleton: imports, registry scopes and the wheel's contents."""
import subprocess
import sys
import zipfile

import pytest

TOOLBOXES = ('mmdet', 'mmseg', 'mmpretrain')


def test_package_imports_no_toolbox():
    code = ('import sys, convneur_mm, convneur_mm.models, convneur_mm.engine; '
            f'bad = sorted({{m.split(".")[0] for m in sys.modules}} & {set(TOOLBOXES)}); '
            'assert not bad, bad; print(convneur_mm.__version__)')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize('scope', TOOLBOXES)
def test_backbone_resolves_from_each_toolbox_scope(scope):
    from mmengine.registry import DefaultScope, init_default_scope
    from convneur_mm.models import ConvNeur
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    init_default_scope(scope)
    try:
        assert registry.get('convneur_mm.ConvNeur') is ConvNeur
        model = registry.build(dict(type='convneur_mm.ConvNeur', arch='m1'))
        assert isinstance(model, ConvNeur)
    finally:
        DefaultScope._instance_dict.pop(f'{scope}', None)


def test_wheel_carries_configs_and_tools(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    for path in ('convneur_mm/.mim/configs/cascade_rcnn_convneur_m3_1x_coco.py',
                 'convneur_mm/.mim/configs/fpn_convneur_m2_80k_ade20k.py',
                 'convneur_mm/.mim/configs/cls_convneur_m1_300e_in1k.py',
                 'convneur_mm/.mim/tools/train.py',
                 'convneur_mm/.mim/tools/dist_train.sh',
                 'convneur_mm/models/backbones/convneur.py'):
        assert path in names, path
    assert not any('__pycache__' in n for n in names)
