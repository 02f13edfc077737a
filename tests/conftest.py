import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
