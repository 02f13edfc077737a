"""convneur_mm.utils.import_hooks: a callback after a module's import, never
an import of its own (how the model index reaches MMPretrain's hub)."""
import importlib
import sys
import textwrap

import pytest

from convneur_mm.utils.import_hooks import when_imported


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A directory on sys.path for throwaway modules named hooked_*."""
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith('hooked_')]:
        del sys.modules[name]


def _write(path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


def test_callback_runs_once_after_the_module_has_executed(modules):
    _write(modules / 'hooked_a.py', 'VALUE = 42\n')
    seen = []
    when_imported('hooked_a', lambda module: seen.append(module.VALUE))
    assert seen == [] and 'hooked_a' not in sys.modules  # the hook imports nothing
    import hooked_a
    assert seen == [42]
    # the module keeps its own loader (inspect, linecache and reload use it)
    assert type(hooked_a.__loader__).__name__ == 'SourceFileLoader'
    assert hooked_a.__spec__.loader is hooked_a.__loader__
    importlib.reload(hooked_a)
    assert seen == [42]


def test_a_module_imported_already_gets_the_callback_at_once(modules):
    _write(modules / 'hooked_b.py', 'VALUE = 7\n')
    import hooked_b
    seen = []
    when_imported('hooked_b', lambda module: seen.append(module.VALUE))
    assert seen == [7]


def test_a_submodule_is_complete_when_its_callback_runs(modules):
    """Like mmpretrain.apis.model, imported while its package initialises."""
    package = modules / 'hooked_pkg'
    package.mkdir()
    _write(package / '__init__.py', 'from . import sub\n')
    _write(package / 'sub.py', 'from .other import Z\nY = Z + 1\n')
    _write(package / 'other.py', 'Z = 3\n')
    seen = []
    when_imported('hooked_pkg.sub', lambda module: seen.append(module.Y))
    import hooked_pkg
    assert seen == [4] and hooked_pkg.sub.Y == 4


def test_a_failing_callback_warns_and_never_breaks_the_import(modules):
    _write(modules / 'hooked_c.py', 'X = 1\n')
    when_imported('hooked_c', lambda module: 1 / 0)
    with pytest.warns(RuntimeWarning, match='ZeroDivisionError.*hooked_c|hooked_c.*ZeroDivision'):
        import hooked_c
    assert hooked_c.X == 1
