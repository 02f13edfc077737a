"""The devices a twin test runs on: the CPU always, CUDA marked ``gpu`` (run
by ``make test-gpu``, skipped with the reason where no GPU is visible).

A test that checks one behaviour on both takes a ``device`` argument::

    @pytest.mark.parametrize('device', DEVICES)
    def test_x(device): ...

so that its GPU case is collected, renamed and changed with it.
"""
import pytest

CUDA = pytest.param('cuda', marks=pytest.mark.gpu, id='cuda')
DEVICES = ['cpu', CUDA]


def on_cuda(*values, id: str = None):  # noqa: A002 (pytest's name)
    """One parameter set of a test's CUDA case, marked ``gpu``."""
    return pytest.param(*values, marks=pytest.mark.gpu, id=id)
