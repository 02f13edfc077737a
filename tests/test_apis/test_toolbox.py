"""Importing a config's toolbox: a known conflict gets a clear error."""
import os
import os.path as osp
import subprocess
import sys

import pytest

from convneur_mm.apis.toolbox import ToolboxImportError, import_toolbox
from tests.paths import REPO

DEEP = TypeError('NoneType takes no arguments')  # what mmpretrain 1.2 raised beside 5.17


def _failing_import(name):
    raise DEEP


def _versions(**installed):
    return lambda name: installed.get(name)


def test_mmpretrain_beside_transformers_5_says_what_to_do():
    fix = r'transformers 5\.17\.0.*"transformers<5"'
    with pytest.raises(ToolboxImportError, match=fix) as info:
        import_toolbox('mmpretrain', _failing_import,
                       _versions(transformers='5.17.0', mmpretrain='1.2.0'))
    assert info.value.__cause__ is DEEP and 'mmpretrain 1.2.0' in str(info.value)


def test_an_unrelated_failure_beside_transformers_5_is_not_blamed_on_it():
    """A broken mmcv (say) is not the transformers conflict."""
    broken = ImportError('libcudart.so.13: cannot open shared object file')

    def failing(name):
        raise broken
    with pytest.raises(ImportError) as info:
        import_toolbox('mmpretrain', failing, _versions(transformers='5.17.0'))
    assert info.value is broken


@pytest.mark.parametrize('scope,transformers', [
    ('mmpretrain', '4.46.3'), ('mmpretrain', None), ('mmdet', '5.17.0')])
def test_other_import_failures_are_raised_as_they_are(scope, transformers):
    with pytest.raises(TypeError) as info:
        import_toolbox(scope, _failing_import, _versions(transformers=transformers))
    assert info.value is DEEP


def test_the_installed_toolboxes_import():
    for scope in ('mmdet', 'mmseg', 'mmpretrain'):
        assert import_toolbox(scope).MODELS.scope == scope


# A stand-in for transformers 5 as mmpretrain 1.2 meets it: it imports, but
# the names mmpretrain subclasses are not what it expects (5.17's failure:
# ``class BertPreTrainedModel(PreTrainedModel)`` -> NoneType takes no arguments).
STAND_IN = """
def __getattr__(name):
    if name.startswith('__') or name == 'Adafactor':  # MMEngine probes Adafactor
        raise AttributeError(name)
    return None
"""


# test.py is a `slow` case: it shares train.py's check
@pytest.mark.parametrize('tool', ['train.py', pytest.param('test.py', marks=pytest.mark.slow)])
def test_tools_stop_with_the_fix_before_anything_else(tmp_path, tool):
    """tools/train.py and tools/test.py on the classification demo beside a
    transformers 5 stand-in (a package and its distribution metadata): exit
    1, the message names the conflict and the fix, no work dir is made."""
    site = tmp_path / 'site'
    package = site / 'transformers'
    for sub in ('', 'models', 'models/auto'):
        (package / sub).mkdir(parents=True, exist_ok=True)
        (package / sub / '__init__.py').write_text(STAND_IN)
    (package / 'models' / 'auto' / 'auto_factory.py').write_text(STAND_IN)
    meta = site / 'transformers-5.17.0.dist-info'
    meta.mkdir()
    (meta / 'METADATA').write_text('Metadata-Version: 2.1\nName: transformers\nVersion: 5.17.0\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(site), REPO, os.environ.get('PYTHONPATH')) if p))
    work_dir = tmp_path / 'work'
    checkpoint = tmp_path / 'epoch_1.pth'
    checkpoint.write_bytes(b'not read: the toolbox check comes first')
    run = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', tool),
         osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py'),
         *([str(checkpoint)] if tool == 'test.py' else []), '--work-dir', str(work_dir)],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert 'ToolboxImportError: mmpretrain 1.2.0 cannot be imported beside transformers ' \
        '5.17.0' in run.stderr, run.stderr[-2000:]
    assert '"transformers<5"' in run.stderr
    assert not work_dir.exists()
