""".dev_scripts/build_mmcv_cuda_wheel.sh in its dry run: the plan it prints
(tools/setup/cuda_setup.py's steps in order, that torch, those archs, that
output folder) and its refusal of bad arguments. The build itself needs
PyPI and an hour of two cores; it is not run here."""
import os
import os.path as osp
import subprocess
import sys

import pytest

from ..paths import REPO

SCRIPT = osp.join(REPO, '.dev_scripts', 'build_mmcv_cuda_wheel.sh')


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', SCRIPT, '--dry-run', '--build-dir', str(tmp_path / 'build'),
                           '--out', str(tmp_path / 'wheels'), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=dict(os.environ))


def _plan(done: subprocess.CompletedProcess) -> list:
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith('[plan]')]


def _index(plan: list, text: str) -> int:
    return next(i for i, line in enumerate(plan) if text in line)


def test_plan_runs_the_setup_steps_in_order_for_that_python_and_torch(tmp_path):
    done = _run(tmp_path, '--python', sys.executable, '--torch', '2.11.0+cu130')
    plan = _plan(done)
    version = '%d.%d' % sys.version_info[:2]
    assert f'for Python {version}' in done.stdout
    steps = ['-m venv', 'requirements/build.txt', 'torch==2.11.0', 'compiler-requirements',
             'cuda_setup.py flavor', 'cuda_setup.py build-env', 'pip download', 'pip wheel',
             'cuda_setup.py record']
    order = [_index(plan, step) for step in steps]
    assert order == sorted(order)
    assert "TORCH_CUDA_ARCH_LIST='9.0'" in plan[_index(plan, 'cuda_setup.py flavor')]
    assert 'mmcv==2.1.0' in plan[_index(plan, 'pip download')]
    assert str(tmp_path / 'build' / 'src') in plan[_index(plan, 'pip wheel')]
    assert str(tmp_path / 'wheels') in plan[-1]
    assert not (tmp_path / 'build').exists() and not (tmp_path / 'wheels').exists()


def test_a_local_torch_build_comes_from_the_index_given(tmp_path):
    plan = _plan(_run(tmp_path, '--python', sys.executable, '--torch', '2.11.0+cu130',
                      '--arch', '8.0;9.0+PTX', '--torch-index', 'https://example.org/whl/cu130'))
    assert 'torch==2.11.0+cu130 --index-url https://example.org/whl/cu130' in \
        plan[_index(plan, 'torch==')]
    assert "TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'" in plan[_index(plan, 'cuda_setup.py flavor')]


@pytest.mark.parametrize('args, reason', [
    (['--torch', '2.11.0'], '--python'),
    (['--python', '3.12', '--torch', '2.11'], "not '2.11'"),
    (['--python', '3.12', '--torch', '2.11.0', '--arch', 'sm_90'], "not 'sm_90'"),
    (['--python', 'twelve', '--torch', '2.11.0'], "not 'twelve'"),
    (['--python', '3.99', '--torch', '2.11.0'], 'no Python 3.99'),
    (['--python', '3.12', '--torch', '2.11.0', '--torch-index', 'https://example.org'],
     'needs a local build'),
])
def test_bad_arguments_are_refused_with_the_reason(tmp_path, args, reason):
    done = _run(tmp_path, *args)
    assert done.returncode == 2 and reason in done.stderr, done.stderr
