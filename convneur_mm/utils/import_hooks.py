"""Run a callback once a module has been imported, without importing it.

convneur_mm must stay cheap to import and import no toolbox, yet it has to
register itself with a toolbox (MMPretrain's model hub) when that toolbox is
used. A post-import hook does both: the callback runs right after the watched
module has executed, or at once if it already has.
"""
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Callable, Dict, List, Set

Callback = Callable[[ModuleType], None]


def _run(callbacks: List[Callback], module: ModuleType) -> None:
    """A failing callback warns: it must never break the import of the module
    it watches (the user imported a toolbox, not us)."""
    for callback in callbacks:
        try:
            callback(module)
        except Exception as err:  # noqa: BLE001 (reported, not swallowed)
            warnings.warn(f'{callback.__module__}.{callback.__qualname__} failed after '
                          f'importing {module.__name__}: {type(err).__name__}: {err}',
                          RuntimeWarning, stacklevel=2)


class _CallbackLoader(importlib.abc.Loader):
    """Wraps the module's own loader; the module keeps the real one."""

    def __init__(self, loader: importlib.abc.Loader, callbacks: List[Callback]):
        self._loader, self._callbacks = loader, callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _run(self._callbacks, module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: finds nothing itself, but wraps the loader
    of a watched module that the other finders find."""

    def __init__(self):
        self.callbacks: Dict[str, List[Callback]] = {}
        self._resolving: Set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.callbacks or fullname in self._resolving:
            return None
        self._resolving.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._resolving.discard(fullname)
        if spec is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        spec.loader = _CallbackLoader(spec.loader, self.callbacks.pop(fullname))
        return spec


_FINDER = _PostImportFinder()


def when_imported(module_name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once ``module_name`` has been imported: now
    if it already is, else right after its import (its first one only)."""
    module = sys.modules.get(module_name)
    if module is not None:
        _run([callback], module)
        return
    _FINDER.callbacks.setdefault(module_name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
