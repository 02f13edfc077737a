"""One measurement in a fresh process.

Benchmarks that report a peak memory run each measurement in its own process,
so that the peak is its own (a caching allocator and malloc keep what earlier
measurements freed). ``run_isolated`` calls a function of a module file in a
fresh interpreter and returns what it returned (JSON). Against an older
checkout's package: ``before_checkout.run_in_checkout``.

    python convneur_mm/analysis/isolated.py MODULE_FILE FUNCTION JSON_KWARGS
"""
import importlib.util
import json
import os.path as osp
import subprocess
import sys
from typing import Any, Dict

_RESULT_MARK = '@@isolated-result@@ '


def run_isolated(module_file: str, function: str, kwargs: Dict[str, Any]) -> Any:
    """``function(**kwargs)`` of the module at ``module_file``, in a fresh process.

    Args:
        module_file: path of the Python file that defines ``function``.
        function: the name of a module-level function returning JSON-able data.
        kwargs: its keyword arguments (JSON-able).

    Returns:
        The function's return value.

    Raises:
        RuntimeError: the child failed; the message ends with its stderr.
    """
    cmd = [sys.executable, osp.abspath(__file__), osp.abspath(module_file), function,
           json.dumps(kwargs)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    results = [line[len(_RESULT_MARK):] for line in done.stdout.splitlines()
               if line.startswith(_RESULT_MARK)]
    if done.returncode != 0 or not results:
        raise RuntimeError(f'{osp.basename(module_file)}:{function}({kwargs}) failed in its '
                           f'process (exit {done.returncode}):\n{done.stderr[-3000:]}')
    return json.loads(results[-1])


def _main(argv) -> None:
    module_file, function, kwargs = argv
    # this file's folder is sys.path[0] when run by path; its module names
    # (profiling, resolution, ...) must not shadow installed ones
    here = osp.dirname(osp.abspath(__file__))
    sys.path[:] = [p for p in sys.path if osp.abspath(p or '.') != here]
    spec = importlib.util.spec_from_file_location('convneur_isolated_target', module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = getattr(module, function)(**json.loads(kwargs))
    print(_RESULT_MARK + json.dumps(result), flush=True)


if __name__ == '__main__':
    _main(sys.argv[1:])
