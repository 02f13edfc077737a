"""The memory kernels' interpreter runs: a test module's function run in a
subprocess with TRITON_INTERPRET=1 (triton reads it once, when it is first
imported), its JSON result read back.

Each run takes one core for up to a minute. The session queues the runs that
its selected tests' fixtures need (``FIXTURE_RUNS``) as soon as the tests are
collected (``tests/conftest.py``), and one background thread works through
the queue, one run at a time, beside the rest of the suite. A test that needs
a run waits for it, or runs it itself if the thread has not reached it yet.
"""
import json
import os
import subprocess
import sys
import threading
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from .paths import REPO

Key = Tuple[str, str]  # (function, the module's dotted name)
# fixture name -> the run it reads; a folder's conftest registers its fixtures' runs
FIXTURE_RUNS: Dict[str, Key] = {}
Outcome = Tuple[int, str, str]  # returncode, stdout, stderr
TIMEOUT_S = 900
_lock = threading.Condition()
_queue: List[Key] = []
_envs: Dict[Key, dict] = {}  # each run's environment, copied where it was queued
_done: Dict[Key, Outcome] = {}
_running: Dict[Key, Optional[subprocess.Popen]] = {}  # None: taken, not started yet
_stopped = [False]
_worker: Optional[threading.Thread] = None


def _environment() -> dict:
    # copied in the main thread: tests change os.environ while the worker runs
    return dict(os.environ, TRITON_INTERPRET='1',
                PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))


def _run(key: Key, env: dict) -> Outcome:
    what, module = key
    with _lock:
        if _stopped[0]:
            return -1, '', 'the session ended before this run started'
        child = subprocess.Popen([sys.executable, '-m', module, what], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _running[key] = child
    try:
        stdout, stderr = child.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
    return (child.returncode, stdout.decode(errors='replace'),
            stderr.decode(errors='replace'))


def _work() -> None:
    while True:
        with _lock:
            if not _queue:
                return
            key = _queue.pop(0)
            env = _envs.pop(key)
            _running[key] = None  # taken: a test waits for it
        outcome = -1, '', 'the run was interrupted'
        try:
            outcome = _run(key, env)
        except Exception:  # noqa: B902 - the waiting test fails with it, never hangs
            outcome = -1, '', traceback.format_exc()
        finally:
            with _lock:
                _running.pop(key, None)
                _done[key] = outcome
                _lock.notify_all()


def start(what: str, module: str) -> None:
    """Queue ``module``'s function ``what`` (``module`` a dotted name, e.g.
    ``tests.test_models.test_memory_ops.memory_cases``) for the background
    thread, once (no-op without triton)."""
    global _worker
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    key = (what, module)
    with _lock:
        if key in _queue or key in _running or key in _done:
            return
        _queue.append(key)
        _envs[key] = _environment()
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_work, name='interpreter-runs', daemon=True)
            _worker.start()


def result(what: str, module: str) -> dict:
    """The JSON that ``what`` printed (its last line): from the background
    thread's run, or from a run of its own where the thread has not taken
    it; a failure of the run fails the test."""
    pytest.importorskip('triton')
    key = (what, module)
    with _lock:
        if key in _queue:
            _queue.remove(key)
            _envs.pop(key)
        elif key in _running:
            _lock.wait_for(lambda: key in _done, timeout=TIMEOUT_S + 60)
        outcome = _done.pop(key, None)
    if outcome is None:
        if key in _running:  # still running past its timeout: the worker is stuck
            pytest.fail(f'the interpreter run {what} of {module} did not end')
        outcome = _run(key, _environment())
        with _lock:
            _running.pop(key, None)
    returncode, stdout, stderr = outcome
    assert returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def run_script(script: str) -> dict:
    """``python -c script`` with TRITON_INTERPRET=1 (skipped without triton):
    the JSON of its last printed line; a failure fails the test."""
    pytest.importorskip('triton')
    done = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=_environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(functions: Dict[str, Callable[[], object]]) -> None:
    """A test module's ``__main__`` in the subprocess: print the JSON of its
    function named by the first argument, run in the interpreter without its
    repeated set-up (``tests.interpreter_speed``)."""
    from tests.interpreter_speed import lean_interpreter
    with lean_interpreter():
        found = functions[sys.argv[1]]()
    print(json.dumps(found))


def stop_all() -> None:
    """Drop the queue and end a run that no test will read (an interrupted
    or failing session); no run starts after this."""
    with _lock:
        _stopped[0] = True
        _queue.clear()
        children = [child for child in _running.values() if child is not None]
    for child in children:
        child.kill()
