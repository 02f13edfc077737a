"""The memory kernels' interpreter runs: a test module's function run in a
subprocess with TRITON_INTERPRET=1 (triton reads it once, when it is first
imported), its JSON result read back.

Each run takes one core for up to a minute. The session queues the runs that
its selected tests' ``interpreted`` fixtures need as soon as the tests are
collected (``tests/conftest.py``), and one background thread works through
the queue, one run at a time, beside the rest of the suite. A test that needs
a run waits for it, or runs it itself if the thread has not reached it yet.
"""
import json
import os
import subprocess
import sys
import threading
from typing import Dict, List, Optional, Tuple

import pytest

from .paths import REPO

Key = Tuple[str, str]  # (function, module)
_lock = threading.Condition()
_queue: List[Key] = []
_done: Dict[Key, Tuple[int, str, str]] = {}  # returncode, stdout, stderr
_running: Dict[Key, subprocess.Popen] = {}
_worker: Optional[threading.Thread] = None


def _run(key: Key) -> Tuple[int, str, str]:
    what, module = key
    env = dict(os.environ, TRITON_INTERPRET='1',
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
    child = subprocess.Popen([sys.executable, '-m', f'tests.test_models.test_layers.{module}',
                              what], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    with _lock:
        _running[key] = child
    try:
        stdout, stderr = child.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
    return child.returncode, stdout, stderr


def _work() -> None:
    while True:
        with _lock:
            if not _queue:
                return
            key = _queue.pop(0)
            _running[key] = None  # taken: a test waits for it
        outcome = _run(key)
        with _lock:
            _running.pop(key)
            _done[key] = outcome
            _lock.notify_all()


def start(what: str, module: str) -> None:
    """Queue ``tests.test_models.test_layers.<module>``'s function ``what``
    for the background thread, once (no-op without triton)."""
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
        elif key in _running:
            _lock.wait_for(lambda: key in _done)
        outcome = _done.pop(key, None)
    if outcome is None:
        outcome = _run(key)
        with _lock:
            _running.pop(key)
    returncode, stdout, stderr = outcome
    assert returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def stop_all() -> None:
    """Drop the queue and end a run that no test will read (an interrupted
    or failing session)."""
    with _lock:
        _queue.clear()
        children = [child for child in _running.values() if child is not None]
    for child in children:
        child.kill()
