"""One measurement in a fresh process, of this tree or of an older checkout.

Benchmarks that report a peak memory run each measurement in its own process,
so that the peak is its own (a caching allocator and malloc keep what earlier
measurements freed). ``run_isolated(function, kwargs)`` calls a module-level
function in a fresh interpreter and returns what it returned (JSON).

With ``checkout`` (e.g. ``git worktree add /tmp/before <commit>``) the child's
``convneur_mm`` is the one under ``checkout``, while ``function``'s own module
(and any of ``own_modules``) comes from this tree: the measurement is this
tree's, the measured code the checkout's. ``function``'s module must then
import what it measures inside the function, so that the import finds the
checkout.
"""
import importlib
import inspect
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Any, Callable, Dict, Optional, Sequence

_RESULT_MARK = '@@isolated-result@@ '
# The child: imports the package, loads this tree's modules by file under their
# own names (so that ``import convneur_mm.x`` of those finds them), then calls
# the function and prints its result after a mark (the function may print too).
_CHILD = '''
import importlib, importlib.util, json, sys
import convneur_mm
spec = json.loads(sys.argv[1])
for name, path in spec["modules"]:
    found = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    found.loader.exec_module(module)
function = getattr(importlib.import_module(spec["module"]), spec["function"])
result = function(**spec["kwargs"])
print(spec["mark"] + json.dumps(dict(result=result, package=convneur_mm.__file__)), flush=True)
'''


def check_checkout(checkout: str) -> str:
    """The absolute path of ``checkout``; ValueError where it holds no package."""
    root = osp.abspath(checkout)
    if not osp.isfile(osp.join(root, 'convneur_mm', '__init__.py')):
        raise ValueError(f'{checkout} is not a checkout of this project: it has no '
                         'convneur_mm/__init__.py (make one with `git worktree add PATH COMMIT`)')
    return root


def run_isolated(function: Callable, kwargs: Dict[str, Any], checkout: Optional[str] = None,
                 own_modules: Sequence[str] = ()) -> Any:
    """``function(**kwargs)`` in a fresh process.

    Args:
        function: a module-level function whose arguments and result are JSON.
        kwargs: its keyword arguments.
        checkout: a directory holding an older ``convneur_mm/`` to run against
            (None: this tree's package).
        own_modules: with ``checkout``, more modules of this tree (dotted
            names) that the child takes from this tree rather than from the
            checkout, loaded first (e.g. the probes that do the measuring).

    Returns:
        What ``function`` returned in the child, decoded from JSON.

    Raises:
        ValueError: ``checkout`` holds no package.
        RuntimeError: the child failed (the message ends with its stderr), or
            it measured another package than ``checkout``'s.
    """
    name = f'{function.__module__}.{function.__name__}'
    env, cwd, modules, root = None, None, [], None
    if checkout is not None:
        root = check_checkout(checkout)
        names = list(own_modules) + [function.__module__]
        modules = [(n, inspect.getfile(importlib.import_module(n))) for n in names]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
        cwd = root  # ``python -c`` puts the working directory first on sys.path
    spec = dict(modules=modules, module=function.__module__, function=function.__name__,
                kwargs=kwargs, mark=_RESULT_MARK)
    child = subprocess.run([sys.executable, '-c', _CHILD, json.dumps(spec)], cwd=cwd, env=env,
                           capture_output=True, text=True)
    results = [line[len(_RESULT_MARK):] for line in child.stdout.splitlines()
               if line.startswith(_RESULT_MARK)]
    if child.returncode != 0 or not results:
        where = f' against {checkout}' if checkout is not None else ''
        raise RuntimeError(f'{name}{where} failed in its process (exit {child.returncode}):\n'
                           f'{child.stderr[-3000:]}')
    out = json.loads(results[-1])
    if root is not None and not osp.abspath(out['package']).startswith(root + os.sep):
        raise RuntimeError(f'{name} measured the package at {out["package"]}, '
                           f'not the one under {checkout}')
    return out['result']
