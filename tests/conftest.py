import subprocess
import sys

import pytest

from convneur_mm.utils.cpu_malloc import tune_cpu_malloc

from .paths import REPO


def pytest_configure(config):
    # what tools/train.py does on CPU; spawned test processes inherit it
    tune_cpu_malloc()


@pytest.fixture(scope='session')
def repo_root():
    return REPO


@pytest.fixture(scope='session')
def built_wheel(tmp_path_factory):
    """A wheel of this repository, built once per session."""
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
                    '--no-build-isolation', '-q', '-w', str(out), REPO],
                   check=True, cwd=str(out))
    wheels = list(out.glob('convneur_mm-*.whl'))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(autouse=True)
def _restore_default_scope():
    """Tests that build Runners or call init_default_scope leave MMEngine's
    current default scope behind (a process-wide singleton); registry lookups
    in later tests would then go to that toolbox's registry. Restore it."""
    from mmengine.registry import DefaultScope
    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
