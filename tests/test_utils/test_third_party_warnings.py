"""The stack's known noise is silenced where our entry points start; our own
warnings, and the same words from anywhere else, still show."""
import os
import subprocess
import sys
import warnings

import pytest

from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings
from ..paths import REPO

NOISE = 'pkg_resources is deprecated as an API'
CONFIG = 'cls_convneur_m1_300e_in1k.py'
# what loading a config does on the way (MMEngine's package look-up)
LOOK_UP = 'from mmengine.utils import is_installed\nis_installed("mmpretrain")\n'


def _run(args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS='default')  # every warning shown once per place
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # a whole tool run for its stderr
def test_a_tools_stderr_has_no_pkg_resources_lines(tmp_path):
    unfiltered = _run(['-c', LOOK_UP])
    assert unfiltered.returncode == 0, unfiltered.stderr[-2000:]
    assert NOISE in unfiltered.stderr  # the noise is real without the filter
    checkpoint = tmp_path / 'any.pth'
    checkpoint.write_bytes(b'')
    tool = _run(['tools/test.py', CONFIG, str(checkpoint), '--cfg-options',
                 f'test_dataloader.dataset.data_root={tmp_path / "none"}'])
    assert 'the dataset named by the config is not there' in tool.stderr, tool.stderr[-2000:]
    assert NOISE not in tool.stderr


def test_our_own_warnings_still_show():
    """The filter names the module as well as the message: the same words
    from our code or a script, and other categories, still reach the user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        silence_known_third_party_warnings()
        for module in ('mmengine.utils.package_utils', 'importlib', 'convneur_mm.apis.launch',
                       '__main__', 'mmengine.utils.package_utils_other'):
            warnings.warn_explicit(f'{NOISE}. See ...', UserWarning, module, 1, module=module)
        warnings.warn_explicit(f'{NOISE}. See ...', DeprecationWarning, 'importlib', 1,
                               module='importlib')
    assert [(w.category, w.filename) for w in caught] == [
        (UserWarning, 'convneur_mm.apis.launch'), (UserWarning, '__main__'),
        (UserWarning, 'mmengine.utils.package_utils_other'), (DeprecationWarning, 'importlib')]
