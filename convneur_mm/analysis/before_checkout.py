"""Run one analysis of this tree against an older checkout's package.

``run_in_checkout(checkout, function, kwargs)`` calls ``function(**kwargs)``
in a child process whose ``convneur_mm`` is the one under ``checkout`` (e.g.
``git worktree add /tmp/before <commit>``), while ``function``'s own module
(and any of ``own_modules``) comes from this tree: the measurement is this
tree's, the measured code the checkout's. ``function`` must be a module-level
function whose arguments and result are JSON; its module must import what it
measures inside the function, so that the import finds the checkout.
"""
import importlib
import inspect
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Callable, Dict, Sequence

# The child: imports the checkout's package, loads this tree's modules by file
# under their own names (so that ``import convneur_mm.x`` of those finds
# them), then calls the function.
_CHILD = '''
import importlib.util, json, sys
import convneur_mm
spec = json.loads(sys.argv[1])
for name, path in spec["modules"]:
    found = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    found.loader.exec_module(module)
result = getattr(sys.modules[spec["module"]], spec["function"])(**spec["kwargs"])
print("\\n" + json.dumps(dict(result=result, package=convneur_mm.__file__)))
'''


def check_checkout(checkout: str) -> str:
    """The absolute path of ``checkout``; ValueError where it holds no package."""
    root = osp.abspath(checkout)
    if not osp.isfile(osp.join(root, 'convneur_mm', '__init__.py')):
        raise ValueError(f'{checkout} is not a checkout of this project: it has no '
                         'convneur_mm/__init__.py (make one with `git worktree add PATH COMMIT`)')
    return root


def run_in_checkout(checkout: str, function: Callable, kwargs: Dict,
                    own_modules: Sequence[str] = ()) -> object:
    """``function(**kwargs)`` run against the package under ``checkout``.

    Args:
        checkout: a directory that holds an older ``convneur_mm/``.
        function: a module-level function of this tree; its arguments and
            result must be JSON.
        kwargs: its keyword arguments.
        own_modules: more modules of this tree (dotted names) that the child
            takes from this tree rather than from the checkout, loaded first
            (e.g. the probes that do the measuring).

    Returns:
        What ``function`` returned in the child, decoded from JSON.
    """
    root = check_checkout(checkout)
    names = list(own_modules) + [function.__module__]
    modules = [(name, inspect.getfile(importlib.import_module(name))) for name in names]
    spec = dict(modules=modules, module=function.__module__, function=function.__name__,
                kwargs=kwargs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    # cwd=root: ``python -c`` puts the working directory first on sys.path
    child = subprocess.run([sys.executable, '-c', _CHILD, json.dumps(spec)], cwd=root,
                           env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f'{function.__name__} against {checkout} failed:\n'
                           f'{child.stderr[-3000:]}')
    out = json.loads(child.stdout.splitlines()[-1])
    if not osp.abspath(out['package']).startswith(root + os.sep):
        raise RuntimeError(f'{function.__name__} measured the package at {out["package"]}, '
                           f'not the one under {checkout}')
    return out['result']
