"""The memory kernels' interpreter runs: a test module's function run in a
subprocess with TRITON_INTERPRET=1 (triton reads it once, when it is first
imported), its JSON result read back.

Each run takes one core for one to three minutes, so a run is made once per
test run, also under pytest-xdist: its outcome lands in the run's folder
(``begin``), beside a lock that whoever makes it holds. At its first test a
session queues the runs that its selected tests' fixtures read
(``FIXTURE_RUNS``), each worker its share, and a background thread works
through them beside the suite; in a single process the files that read
them run last (``tests/conftest.py``). A test that needs a run reads its outcome, waits on
its lock, or makes it itself where nobody has.
"""
import json
import os
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import pytest

from .paths import REPO

Key = Tuple[str, str]  # (function, the module's dotted name)
# fixture name -> the run it reads; a folder's conftest registers its fixtures' runs
FIXTURE_RUNS: Dict[str, Key] = {}
Outcome = Tuple[int, str, str]  # returncode, stdout, stderr
TIMEOUT_S = 900


def _environment() -> dict:
    # copied in the main thread: tests change os.environ while the worker runs
    return dict(os.environ, TRITON_INTERPRET='1',
                PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))


def wanted(fixture_names: Iterable[Iterable[str]]) -> List[Key]:
    """The runs that tests with these fixture names read, in their order."""
    keys: List[Key] = []
    for names in fixture_names:
        for name in names:
            key = FIXTURE_RUNS.get(name)
            if key is not None and key not in keys:
                keys.append(key)
    return keys


class InterpreterRuns:
    """One process's part in the test run's interpreter runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: List[Key] = []
        self._children: List[subprocess.Popen] = []
        self._folder: Optional[Path] = None  # where outcomes land; None: nowhere
        self._stopped = False

    def begin(self, folder: Path, keys: List[Key]) -> None:
        """Land outcomes in ``folder`` (shared by the test run's workers) and
        make ``keys`` there in a background thread (none without triton)."""
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder
        try:
            import triton  # noqa: F401
        except ImportError:
            return
        with self._lock:
            self._queue.extend(key for key in keys if key not in self._queue)
        threading.Thread(target=self._work, args=(_environment(),), name='interpreter-runs',
                         daemon=True).start()

    def result(self, what: str, module: str) -> dict:
        """The JSON that ``what`` printed (its last line), from its one run in
        this test run; a failure of the run fails the test."""
        pytest.importorskip('triton')
        key = (what, module)
        with self._lock:
            if key in self._queue:  # not started: made now, not after the thread's others
                self._queue.remove(key)
        outcome = self._made(key, _environment())
        if outcome is None:
            pytest.fail(f'the interpreter run {what} of {module} was stopped')
        returncode, stdout, stderr = outcome
        assert returncode == 0, stderr[-4000:]
        return json.loads(stdout.strip().splitlines()[-1])

    def stop_all(self) -> None:
        """Drop the queue and end the runs still going (this process's end:
        the other workers make what they still need); none starts after."""
        with self._lock:
            self._stopped = True
            self._queue.clear()
            children = list(self._children)
        for child in children:
            child.kill()

    def _run(self, key: Key, env: dict) -> Optional[Outcome]:
        """The subprocess's outcome; None where ``stop_all`` came first."""
        what, module = key
        with self._lock:
            if self._stopped:
                return None
            child = subprocess.Popen([sys.executable, '-m', module, what], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self._children.append(child)
        try:
            stdout, stderr = child.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
        finally:
            with self._lock:
                self._children.remove(child)
        if self._stopped:  # killed by stop_all: no outcome of this run
            return None
        return (child.returncode, stdout.decode(errors='replace'),
                stderr.decode(errors='replace'))

    def _made(self, key: Key, env: dict) -> Optional[Outcome]:
        """``key``'s outcome: read from the run's folder, after whoever makes
        it there has ended, or made here and left there for the others."""
        if self._folder is None:
            return self._run(key, env)
        from filelock import FileLock
        what, module = key
        landed = self._folder / f'{module}.{what}.json'
        # a FileLock of its own per call: two threads of a process exclude each other too
        with FileLock(str(landed) + '.lock', timeout=TIMEOUT_S + 60, thread_local=False):
            if landed.exists():
                return tuple(json.loads(landed.read_text()))
            outcome = self._run(key, env)
            if outcome is not None:
                partial = landed.with_suffix('.partial')
                partial.write_text(json.dumps(outcome))
                partial.replace(landed)
            return outcome

    def _work(self, env: dict) -> None:
        while True:
            with self._lock:
                if not self._queue or self._stopped:
                    return
                key = self._queue.pop(0)
            try:
                self._made(key, env)
            except Exception:  # noqa: B902 - the reading test makes the run itself
                traceback.print_exc()


SESSION = InterpreterRuns()  # this pytest process's (tests/conftest.py begins it)


def result(what: str, module: str) -> dict:
    """``SESSION.result``: the JSON of this test run's one run of ``what``."""
    return SESSION.result(what, module)


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

