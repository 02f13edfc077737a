"""The package skeleton: imports, registry scopes, the wheel's and the sdist's contents."""
import subprocess
import sys
import tarfile
import zipfile

import pytest

TOOLBOXES = ('mmdet', 'mmseg', 'mmpretrain')


def test_package_imports_no_toolbox_and_no_dynamo():
    # Dynamo is about 1.7 s of every process that imports it (tools, workers), on a CPU
    code = ('import sys, convneur_mm, convneur_mm.models, convneur_mm.engine; '
            f'bad = sorted({{m.split(".")[0] for m in sys.modules}} & {set(TOOLBOXES)}); '
            "bad += [m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules]; "
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


MIM_FILES = ('configs/cascade_rcnn_convneur_m3_1x_coco.py', 'configs/fpn_convneur_m2_80k_ade20k.py',
             'configs/cls_convneur_m1_300e_in1k.py', 'configs/demo/cls_convneur_m1_imagenet_tiny.py',
             'configs/metafiles/in1k.yml', 'configs/metafiles/coco.yml',
             'configs/metafiles/ade20k.yml', 'model-index.yml',
             'tools/train.py', 'tools/test.py', 'tools/dist_train.sh',
             'tools/analysis_tools/analyze_model.py', 'tools/analysis_tools/benchmark.py')


def test_wheel_carries_configs_tools_and_model_index(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    expected = [f'convneur_mm/.mim/{path}' for path in MIM_FILES] + [
        'convneur_mm/models/backbones/convneur.py', 'convneur_mm/model_index.py']
    missing = [path for path in expected if path not in names]
    assert not missing, missing
    assert not any('__pycache__' in n for n in names)
    assert not any(n.startswith('convneur_mm/.mim/tools/setup/') for n in names)  # DEV_ONLY
    # the lab measures the package from a checkout: it is not shipped
    assert not any(n.startswith(('benchmarks/', 'convneur_mm/.mim/benchmarks')) for n in names)


def test_sdist_carries_what_the_wheel_build_needs(repo_root, tmp_path, built_wheel):
    # after the run's one wheel build (built_wheel): both write egg-info in the checkout
    subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(tmp_path)],
                   cwd=repo_root, check=True, capture_output=True)
    sdist, = tmp_path.glob('convneur_mm-*.tar.gz')
    names = {n.split('/', 1)[1] for n in tarfile.open(sdist).getnames() if '/' in n}
    missing = set(MIM_FILES + ('requirements.txt', 'requirements/openmmlab.txt', 'setup.py',
                               'README.md')) - names
    assert not missing, missing
    assert not any(n.startswith('benchmarks/') for n in names)
