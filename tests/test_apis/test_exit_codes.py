"""Exit codes of distributed runs are true: a run whose work is done
exits 0, even when something aborts while the interpreter is torn down; a run
that failed before that exits non-zero.

The abort guarded against (gloo's worker thread taking the GIL during
interpreter finalization, pytorch/pytorch#190489; see convneur_mm/apis/exit.py)
is a race. Two kinds of test cover it:

* a planted abort at interpreter tear-down (a ``sitecustomize`` on the ranks'
  PYTHONPATH whose object calls ``os.abort()`` when it is deleted, late in
  ``Py_FinalizeEx``, where the real abort happens). It fails the old ending
  deterministically (``shutdown_only``: destroy the group, return) and is
  skipped by ours. Run through the real ``tools/dist_test.sh`` as well.
* a few runs of the real race under a deliberate CPU load, which must all
  exit 0. On the old ending it aborts at a rate that depends on the load
  (docs/advanced_guides/exit_codes.md; .dev_scripts/exit_code_soak.sh measures it on
  the demos).

The rest:

* failures exit non-zero: an exception on rank 1, rank 1 dying of SIGABRT,
  rank 0 in a collective whose peer left, and rank 1 failing after rank 0 has
  printed the metrics but before the final barrier;
* what a normal exit does is kept: a non-daemon thread is joined, an idle
  thread pool is stopped, ``atexit`` handlers run, unflushed output is written;
  exit 120 when stdout is a closed pipe;
* ``tools/setup/run_demo.sh`` runs every demo after a failure and exits 1 with
  the list.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import pytest

from tests.test_engine.dist_utils import free_port
from tests.paths import REPO

WORKER = osp.join(osp.dirname(osp.abspath(__file__)), 'exit_code_worker.py')

ABORT_AT_TEARDOWN = '''\
"""Planted by test_exit_codes.py: abort while the interpreter is torn down,
in the ranks only (not in torchrun's agent)."""
import os


class AbortAtTeardown:
    def __init__(self):
        self.abort = os.abort

    def __del__(self):
        self.abort()


if 'LOCAL_RANK' in os.environ:
    planted = AbortAtTeardown()
'''


@pytest.fixture
def abort_at_teardown(tmp_path) -> str:
    """A PYTHONPATH entry whose sitecustomize aborts each rank at tear-down."""
    site = tmp_path / 'abort_at_teardown'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(ABORT_AT_TEARDOWN)
    return str(site)


def _env(extra_path=None, **extra):
    path = [p for p in (extra_path, REPO, os.environ.get('PYTHONPATH')) if p]
    env = {k: v for k, v in os.environ.items()
           if k not in ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update(PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS='1', **extra)
    return env


def _torchrun(*args, extra_path=None, timeout=180):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           f'--master_port={free_port()}', WORKER, *args]
    return subprocess.run(cmd, env=_env(extra_path), capture_output=True, text=True,
                          timeout=timeout)


def _log(run):
    return (run.stdout + run.stderr)[-3000:]


# ------------------------------------------------ success exits 0
@pytest.mark.slow  # tools/dist_test.sh's test below plants the same abort in the real tool
def test_a_late_abort_cannot_fail_a_finished_run(abort_at_teardown):
    run = _torchrun('exit_successfully', extra_path=abort_at_teardown)
    assert run.returncode == 0, _log(run)
    assert "metrics: {'mIoU': 88.0}" in run.stdout


@pytest.mark.slow  # validates the planted abort, not our ending
def test_the_old_ending_fails_on_a_late_abort(abort_at_teardown):
    """Validates the planted abort: without our ending, it turns a finished
    run into a failure, as gloo's race did."""
    run = _torchrun('shutdown_only', extra_path=abort_at_teardown)
    assert "metrics: {'mIoU': 88.0}" in run.stdout
    assert run.returncode != 0 and 'Signal 6 (SIGABRT)' in run.stderr, _log(run)


@pytest.fixture
def cpu_load():
    """One busy process beside the runs, as on a shared 2-core machine."""
    burner = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
    yield
    burner.kill()
    burner.wait()


@pytest.mark.slow
def test_runs_under_load_all_exit_0(cpu_load):
    codes = [_torchrun('exit_successfully').returncode for _ in range(3)]
    assert codes == [0, 0, 0]


# ------------------------------------------------ failures exit non-zero
# the signal and the lost peer are `slow` cases: each is a run as long as the exception's
@pytest.mark.parametrize('how', ['exception', *(pytest.param(h, marks=pytest.mark.slow)
                                                for h in ('abort', 'peer-dies'))])
def test_a_failure_before_the_end_exits_non_zero(how):
    """An exception, a rank dying of a signal (SIGKILL reads the same to
    torchrun as the SIGABRT used here), a collective whose peer is gone."""
    run = _torchrun('exit_successfully', '--fail', how, timeout=120)
    assert run.returncode != 0, _log(run)
    assert 'metrics:' not in run.stdout
    assert re.search(r'exit ?code|exitcode|FAILED', run.stderr), _log(run)


def test_a_failure_after_the_metrics_before_the_group_is_destroyed_exits_non_zero():
    """Printed metrics do not make a run successful: rank 1 fails before the
    final barrier, and the run fails."""
    run = _torchrun('exit_successfully', '--fail', 'late', timeout=120)
    assert "metrics: {'mIoU': 88.0}" in run.stdout
    assert run.returncode != 0, _log(run)
    assert 'a failure after the metrics' in run.stderr, _log(run)


# ------------------------------------------------ the real tool
def test_dist_test_exits_0_despite_a_late_abort(abort_at_teardown, tmp_path):
    """tools/dist_test.sh, 2 gloo processes, the demo segmentor on 2 tiny
    ADE20K images: the table is printed and the exit status is 0."""
    from mmengine.runner import save_checkpoint
    from convneur_mm.demo_data.ade20k import generate_ade20k_tiny
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    demo = osp.join(REPO, 'configs', 'demo', 'fpn_convneur_m2_ade20k_tiny.py')
    data = str(tmp_path / 'ade20k_tiny')
    generate_ade20k_tiny(data, num_train=2, num_val=2)
    checkpoint = str(tmp_path / 'init.pth')
    save_checkpoint(dict(meta={}, state_dict=build_model(load_config(demo)).state_dict()),
                    checkpoint)
    run = subprocess.run(
        [osp.join(REPO, 'tools', 'dist_test.sh'), demo, checkpoint, '2',
         '--work-dir', str(tmp_path / 'test')],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=_env(abort_at_teardown, ADE20K_TINY_ROOT=data, PYTHON=sys.executable,
                 PORT=str(free_port())))
    assert run.returncode == 0, _log(run)
    assert re.search(r'^\| mIoU \| [\d.]+ \|$', run.stdout, re.M), run.stdout[-2000:]


# ------------------------------------------------ the main job
def test_main_job_runs_every_demo_and_fails_if_one_failed(tmp_path):
    """tools/setup/run_demo.sh goes on after a failed demo and ends with exit 1 and
    the list (a stand-in interpreter fails every step and logs its calls)."""
    calls = tmp_path / 'calls'
    python = tmp_path / 'python'
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 1\n')
    python.chmod(0o755)
    run = subprocess.run([osp.join(REPO, 'tools', 'setup', 'run_demo.sh')], cwd=REPO,
                         env=_env(PYTHON=str(python), DEMOS='smoke segmentation',
                                  ADE20K_TINY_ROOT=str(tmp_path / 'no_data')),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, _log(run)
    assert 'FAILED demos: smoke segmentation' in run.stderr
    lines = calls.read_text().splitlines()
    assert any('smoke.py' in line for line in lines)
    assert any('convneur_mm.demo_data.ade20k' in line for line in lines)  # reached


# ------------------------------------------------ what a normal exit does, kept
EXITING = '''
import atexit, sys, threading, time
from convneur_mm.apis.exit import exit_successfully
out = sys.argv[1]
def late_writer():
    time.sleep(0.3)
    open(out + '.thread', 'w').write('joined')
threading.Thread(target=late_writer).start()
if len(sys.argv) > 3:  # an idle pool kept for later, as Inductor's compile workers
    import concurrent.futures
    pool = concurrent.futures.ThreadPoolExecutor(2)
    pool.submit(int).result()
atexit.register(lambda: open(out + '.atexit', 'w').write('ran'))
sys.stdout.write('x' * int(sys.argv[2]))
exit_successfully()
'''


def test_exit_successfully_keeps_what_a_normal_exit_does(tmp_path):
    """Non-daemon threads are joined, atexit handlers run (logging's flush is
    one), buffered output is written; the status is 0."""
    out = str(tmp_path / 'out')
    run = subprocess.run([sys.executable, '-c', EXITING, out, '100'], env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, _log(run)
    assert run.stdout == 'x' * 100  # no newline, no flush: still written
    assert open(out + '.thread').read() == 'joined'
    assert open(out + '.atexit').read() == 'ran'


def test_exit_successfully_stops_idle_thread_pools(tmp_path):
    """An idle ``concurrent.futures`` pool (Inductor keeps one after a
    ``--compile`` run) is shut down as at a normal exit, not waited for
    forever (a join of its workers alone hung)."""
    out = str(tmp_path / 'out')
    run = subprocess.run([sys.executable, '-c', EXITING, out, '1', 'pool'], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, _log(run)
    assert open(out + '.thread').read() == 'joined'


def test_exit_successfully_fails_when_the_output_is_lost(tmp_path):
    """Like CPython: exit status 120 when stdout cannot be flushed (a reader
    that went away)."""
    reader = subprocess.Popen(['true'], stdin=subprocess.PIPE)
    reader.wait()  # the pipe's read end is closed
    env = {k: v for k, v in _env().items() if k != 'PYTHONUNBUFFERED'}  # buffered, flushed at exit
    run = subprocess.run([sys.executable, '-c', EXITING, str(tmp_path / 'out'), '100'],
                         env=env, stdout=reader.stdin, stderr=subprocess.PIPE, timeout=180)
    reader.stdin.close()
    assert run.returncode == 120, run.stderr[-2000:]
