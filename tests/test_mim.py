"""OpenMMLab's launcher, openmim 0.3.9, on our package.

MIM finds a package's tools, configs and model-index.yml in
``<package>/.mim/``, the package being ``<pkg_resources location>/convneur_mm``.
Tested the two ways a user installs us, each independent of how the running
checkout is installed:

* editable: a copy of the repository installed with ``pip install -e`` into a
  throwaway virtual environment layered on this one, MIM run from the
  repository root (``python -m mim``; see setup.py for why there);
* wheel: the wheel installed with ``pip --target``, MIM run from elsewhere.
"""
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from convneur_mm.demo_data.imagenet import generate_imagenet_tiny

from .paths import REPO

pytest.importorskip('mim', reason='openmim is in requirements/mim.txt')

MIM_ITEMS = ('configs', 'tools', 'model-index.yml')
ALL_MODELS = 11  # one per config in configs/*.py (tests/test_model_index.py)
DEMO_CONFIG = 'configs/demo/cls_convneur_m1_imagenet_tiny.py'
SKIP = shutil.ignore_patterns('.git', '.venv', 'work_dirs', 'data', 'docs', '__pycache__',
                              '*.egg-info', '.mim', '.pytest_cache', 'build', 'dist')


def _run(args, cwd, env=None, timeout=300) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope='module')
def editable(tmp_path_factory) -> dict:
    """A copy of the repository, ``pip install -e``'d into a virtual environment
    that sees this environment's packages but not its convneur_mm."""
    root = tmp_path_factory.mktemp('editable')
    checkout, venv = root / 'checkout', root / 'venv'
    shutil.copytree(REPO, checkout, ignore=SKIP)
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = str(venv / 'bin' / 'python')
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          check=True, capture_output=True, text=True).stdout.strip()
    # a path line, not a site dir: this environment's .pth files (its own
    # editable convneur_mm) are not processed
    with open(osp.join(site, 'parent.pth'), 'w') as f:
        f.write(sysconfig.get_paths()['purelib'] + '\n')
    _run([python, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '-q',
          '-e', str(checkout)], cwd=str(root))
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'CONVNEUR_CONFIGS')}
    return dict(root=str(checkout), python=python, env=env)


@pytest.fixture(scope='module')
def wheel(installed_wheel, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('wheel_mim')
    env = {k: v for k, v in os.environ.items() if k != 'CONVNEUR_CONFIGS'}
    env['PYTHONPATH'] = installed_wheel
    return dict(root=str(root), site=installed_wheel, python=sys.executable, env=env)


def _mim(install: dict, *args: str, **kwargs) -> str:
    return _run([install['python'], '-m', 'mim', *args], cwd=install['root'],
                env=install['env'], **kwargs)


def test_editable_install_links_mim_items_to_the_repository(editable):
    mim_dir = osp.join(editable['root'], 'convneur_mm', '.mim')
    for name in MIM_ITEMS:
        link = osp.join(mim_dir, name)
        assert osp.islink(link), link
        assert os.readlink(link) == osp.join('..', '..', name)  # relative: the clone may move
        assert osp.samefile(link, osp.join(editable['root'], name))
    with open(osp.join(editable['root'], 'convneur_mm.egg-info', 'PKG-INFO')) as f:
        assert re.search(r'^Name: convneur-mm$', f.read(), re.M)
    # the package reports the repository's own directories, not the links
    out = _run([editable['python'], '-m', 'convneur_mm', 'configs'], cwd='/', env=editable['env'])
    assert out.strip() == osp.join(editable['root'], 'configs')


def _check_analyze_model_flops(output: str, mim_root: str) -> None:
    """MIM found the tool in the package's tools and passed ``--tasks`` through."""
    script = f'{mim_root}/.mim/tools/analysis_tools/analyze_model.py'
    assert f'{script} --tasks flops ' in output, output[-2000:]
    whole = re.search(r'\| whole \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|', output)
    assert whole, output[-2000:]
    assert float(whole.group(1)) == pytest.approx(4.12, abs=0.01)  # M1's params (M)
    assert float(whole.group(2)) == pytest.approx(0.69, abs=0.01)  # paper GMACs


def test_mim_run_analyze_model_editable(editable):
    out = _mim(editable, 'run', 'convneur_mm', 'analyze_model', '--tasks', 'flops',
               'configs/cls_convneur_m1_300e_in1k.py')
    _check_analyze_model_flops(out, osp.join(editable['root'], 'convneur_mm'))


@pytest.mark.slow  # the editable install's twin covers `mim run`
def test_mim_run_analyze_model_wheel(wheel):
    out = _mim(wheel, 'run', 'convneur_mm', 'analyze_model', '--tasks', 'flops',
               'cls_convneur_m1_300e_in1k.py')
    _check_analyze_model_flops(out, osp.join(wheel['site'], 'convneur_mm'))


@pytest.mark.parametrize('install', ['editable', 'wheel'])
def test_mim_search_lists_the_model_index(install, request):
    out = _mim(request.getfixturevalue(install), 'search', 'convneur_mm')
    names = re.findall(r'^config id: (\S+)$', out, re.M)
    assert len(set(names)) == ALL_MODELS, out[-3000:]
    assert 'convneur-m1_8xb512_in1k' in names
    # filtered by mim: the ConvNeur collection (the classifiers), three fields
    out = _mim(request.getfixturevalue(install), 'search', 'convneur_mm', '--model', 'convneur',
               '--field', 'imagenet-1k/top_1_accuracy', 'config', 'results_source')
    assert re.findall(r'^config id: (\S+)$', out, re.M) == [
        f'convneur-{arch}_8xb512_in1k' for arch in ('m1', 'm2', 'm3', 'm4')]
    m3 = out[out.index('config id: convneur-m3'):].split('-' * 20)[0]
    assert re.search(r'^imagenet-1k/top_1_accuracy\s+80\.0$', m3, re.M), m3
    assert re.search(r'^config\s+configs/cls_convneur_m3_300e_in1k\.py$', m3, re.M), m3
    assert re.search(r'^results_source\s+paper table 2 ', m3, re.M), m3


@pytest.fixture(scope='module')
def tiny_imagenet(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('mim_imagenet'))
    generate_imagenet_tiny(root, train_per_class=3, val_per_class=2)
    return root


@pytest.mark.slow  # a whole training through mim; `mim run` and `mim search` run by default
def test_mim_train_then_test_editable(editable, tiny_imagenet):
    """``mim train ... --gpus 0`` runs tools/train.py with ``--launcher none``;
    ``mim test ... --checkpoint`` evaluates what it saved."""
    env = dict(editable['env'], IMAGENET_TINY_ROOT=tiny_imagenet, OMP_NUM_THREADS='1')
    work_dir = osp.join(editable['root'], 'work_dirs', 'mim')
    install = dict(editable, env=env)
    out = _mim(install, 'train', 'convneur_mm', DEMO_CONFIG, '--gpus', '0', '--work-dir', work_dir,
               '--cfg-options', 'train_cfg.max_epochs=2', 'train_dataloader.batch_size=10',
               'default_hooks.checkpoint.interval=2')
    assert '--launcher none' in out
    assert re.search(r'Epoch\(train\) \[2\]\[3/3\]', out), out[-3000:]
    checkpoint = osp.join(work_dir, 'epoch_2.pth')
    assert osp.isfile(checkpoint)
    out = _mim(install, 'test', 'convneur_mm', DEMO_CONFIG, '--checkpoint', checkpoint,
               '--work-dir', osp.join(work_dir, 'test'))
    top1 = re.search(r'\| accuracy/top1 \| ([\d.]+) \|', out)
    assert top1 and 0 <= float(top1.group(1)) <= 100, out[-3000:]


@pytest.mark.slow  # MMPretrain's reading of the metafile test_model_index checks
def test_model_hub_reads_the_wheels_metafile(wheel):
    """Not MIM, but the same installed layout: MMPretrain's hub gets the
    classifiers from the wheel's .mim, configs included."""
    code = ('import convneur_mm, mmpretrain; print(mmpretrain.list_models("convneur")); '
            'print(mmpretrain.get_model("convneur-m1_8xb512_in1k")._config.filename)')
    out = _run([sys.executable, '-c', code], cwd=wheel['root'], env=wheel['env'])
    lines = out.strip().splitlines()
    assert "['convneur-m1_8xb512_in1k', 'convneur-m2_8xb512_in1k'," in out
    assert osp.join(wheel['site'], 'convneur_mm', '.mim', 'configs',
                    'cls_convneur_m1_300e_in1k.py') in lines, out[-2000:]
