"""The lab's tests run as the package's do (tests/conftest.py): importing it
hides CUDA from this process before torch is imported, and its per-test
hooks and fixtures serve these tests too (a ``gpu`` test runs in a child that
sees the GPUs, MMEngine's default scope is restored after each test). Its
session hooks (skipping ``gpu`` tests without GPUs) are taken once: only
where this folder runs without tests/ do they come from here."""
import pytest

import tests.conftest as suite
from tests.conftest import _no_tf32_on_gpu, _restore_default_scope, repo_root  # noqa: F401


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    return suite.pytest_pyfunc_call(pyfuncitem)


def pytest_collection_modifyitems(config, items):
    if suite not in config.pluginmanager.get_plugins():  # tests/ is not collected
        suite.pytest_collection_modifyitems(config, items)
