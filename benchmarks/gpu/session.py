"""The GPU run (the ``gpu`` case): ``steps.gpu_steps`` under one time limit,
each step in a process of its own, saved as it goes and resumable.

    python -m benchmarks.run gpu --out gpu_results [--limit-s 480] [--only GROUP|STEP ...]
    python -m benchmarks.run gpu --out /tmp/plan --dry-run --only correctness tune/m3

* **Saved as it goes.** After every step a line goes to
  ``OUT/progress.jsonl`` (the step, its status, seconds, the command, its
  log) and, with ``--tar``, the whole folder is packed again, within
  ``--tar-limit-mib`` (the largest Nsight Compute reports left out first,
  each named in the tar); the steps' own JSON records are rewritten after
  each of their cases. A run killed at any point keeps every finished step.
* **A fault takes one step.** A step that fails or hangs is diagnosed from
  its log (the last error line, the memory kernels it names); one whose
  memories plan their own path (``Step.reruns_on_torch``) is run again with
  ``CONVNEUR_MEMORY_IMPLEMENTATION=torch``, its records beside the first
  attempt's (``*.torch.json``). A step that exits 0 without its report
  (Nsight Compute's), with no test run or with a failed row in its record
  (a case records a row's error and goes on) counts as failed, and reruns
  on PyTorch only where a row's error is a GPU fault; one whose record shows
  items skipped for time (a memory bench's budget) is partial.
* **No step starts without its time.** A step starts only where the time
  left holds its estimate (scaled by ``steps.gpu_speed`` for the card), and
  runs under a timeout of twice that and 30 s; then its whole process group
  is stopped. A memory bench gets that time as its own ``--budget-s``.
* **A resume runs only what is missing.** Run again with the same ``--out``:
  steps whose planned attempt ended ok or failed are kept; skipped,
  timed-out, partial (with twice its estimate, once) and never-run steps run
  (``--retry-failed``: the failed ones too).
* **A stopped run stops its step.** On SIGTERM (``timeout``'s) the running
  step's process group is stopped, the step recorded as timed out and the
  folder packed before the run exits.
* **Dry mode.** ``--dry-run`` runs each step's CPU check instead (the lab's
  dry runs, pytest's collection, the kernels in Triton's interpreter) under
  the same bookkeeping; Nsight Compute and compute-sanitizer are only shown.

The exit status is 1 where a step of this run failed or timed out, else 0.
"""
import argparse
import io
import json
import math
import os
import os.path as osp
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from benchmarks.common.record import Record, UsageError
from benchmarks.gpu.steps import MEMORY_KERNELS, NCU_KERNELS, Step, expand, gpu_speed, gpu_steps
from convneur_mm.models.layers.memory_ops.dispatch import FORCE_ENV
from convneur_mm.utils.cli import positive_float, positive_int

PROGRESS = 'progress.jsonl'
TIMEOUT_FACTOR = 2.0
TIMEOUT_SLACK_S = 30.0
DRY_TIMEOUT_S = 900.0  # a CPU's check has no GPU estimate to go by
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL, to a timed-out step's whole process group
THEN_LEAST_S = 20.0  # the least time a step's follow-up command (``Step.then``) gets
# statuses a resume runs again: the step did not finish, or skipped items for time
MISSING = ('skipped', 'timed out', 'not run', 'partial')
# a partial step's tries (the later with twice its estimate) before a resume keeps it
PARTIAL_TRIES = 2
# a GPU host returns files of at most 16 MiB: the tar keeps under this by default,
# leaving out the largest profiler reports (whose details pages are in the logs)
TAR_LIMIT_MIB = 15
LARGE_REPORTS = ('.ncu-rep', )
LEFT_OUT = 'left_out_of_tar.txt'
# how a memory bench records an item its budget left out (``suite.Budget``)
SKIPPED_FOR_TIME = 'skipped: budget'
# how a case records a row that failed and let the others run (``describe_error``),
# and the keys it records it under
ROW_ERROR = 'error: '
ROW_ERROR_KEYS = ('status', 'error', 'errors')
# a row error that says the GPU faulted (every later CUDA call then fails too), where
# a row's own OOM or compile error does not: only a fault reruns the step on PyTorch
GPU_FAULT = re.compile(r'CUDA error|illegal (memory )?(access|address|instruction)|'
                       r'misaligned address|unspecified launch failure|device-side assert',
                       re.I)
NO_FAULT = 'no GPU fault'
_KERNEL = re.compile(r'\b(\w+)_kernel\b')
_ERROR = re.compile(r'^(?:E +)?((\w+(Error|Exception)|CUDA error|FAILED|ERROR|==ERROR==|'
                    r'========= (Invalid|Race|Error|Program hit)).*)', re.M)


def read_progress(out: str) -> List[Dict]:
    """The progress lines of earlier runs into ``out`` (a line cut short by
    a kill is left out)."""
    path = osp.join(out, PROGRESS)
    if not osp.exists(path):
        return []
    lines = []
    with open(path) as f:
        for line in f:
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def finished(progress: Sequence[Dict], retry_failed: bool = False) -> Dict[str, str]:
    """{step: status} of the steps a resume keeps, by each step's last
    planned attempt (its rerun on PyTorch never decides); dry runs' lines
    are no GPU results. A step partial ``PARTIAL_TRIES`` times is kept: its
    estimate, not its time, is short."""
    last = {line['step']: line['status'] for line in _planned(progress)}
    partial = partial_tries(progress)
    return {step: status for step, status in last.items()
            if (not status.startswith(MISSING) or partial.get(step, 0) >= PARTIAL_TRIES)
            and not (retry_failed and status != 'ok')}


def partial_tries(progress: Sequence[Dict]) -> Dict[str, int]:
    """{step: how many of its planned attempts were partial}."""
    return dict(Counter(line['step'] for line in _planned(progress)
                        if line['status'].startswith('partial')))


def _planned(progress: Sequence[Dict]) -> Iterator[Dict]:
    """The lines of steps' planned attempts on a GPU (not their reruns on
    PyTorch, not dry runs), in order."""
    return (line for line in progress
            if not line.get('dry_run') and line.get('attempt', 'as planned') == 'as planned')


def diagnose(log: str, kernel_names: Sequence[str] = ()) -> Dict[str, object]:
    """The last error line of a failed step's log and the memory kernels it
    names (``kernel_names``, without their ``_kernel``)."""
    errors = [m.group(1) for m in _ERROR.finditer(log)]
    named = sorted({f'{name}_kernel' for name in _KERNEL.findall(log[-20000:])
                    if name in kernel_names})
    return dict(error=errors[-1][:300] if errors else None, kernels_named=named)


def pack(out: str, tar_path: str, limit_bytes: Optional[int] = None) -> Optional[str]:
    """``out`` as a gzipped tar at ``tar_path``, atomically, within
    ``limit_bytes`` where given (a GPU host may return no larger file): the
    largest profiler reports (``LARGE_REPORTS``) are left out, each named in
    the tar's ``LEFT_OUT``, until it fits, and copied beside the tar where
    each is within the limit. What could not be packed or was left out, or
    None."""
    tmp = tar_path + '.tmp'
    sizes = {osp.join(root, name): osp.getsize(osp.join(root, name))
             for root, _, names in os.walk(out) for name in names
             if name.endswith(LARGE_REPORTS)}
    reports = sorted(sizes, key=sizes.get, reverse=True)
    limit = math.inf if limit_bytes is None else limit_bytes
    left_out: Dict[str, str] = {}  # each report left out, and its line in LEFT_OUT
    try:
        while True:
            _write_tar(out, tmp, left_out)
            if osp.getsize(tmp) <= limit or not reports:
                break
            path = reports.pop(0)
            left_out[path] = (f'{osp.relpath(path, out)}\t{sizes[path]} bytes'
                              f'{", beside the tar" if sizes[path] <= limit else ""}\n')
        os.replace(tmp, tar_path)
    except OSError as exc:  # a full disk must not end the run: the folder stays
        return f'{type(exc).__name__}: {exc}'
    beside = [path for path in left_out if sizes[path] <= limit]
    try:
        for path in beside:
            shutil.copyfile(path, osp.join(osp.dirname(osp.abspath(tar_path)),
                                           osp.basename(path)))
    except OSError as exc:
        return f'{type(exc).__name__} copying the reports left out: {exc}'
    notes = ([f'left out {len(left_out)} reports to stay within {limit_bytes} bytes '
              f'({len(beside)} copied beside it)'] if left_out else []) + (
                  ['still larger than the limit'] if osp.getsize(tar_path) > limit else [])
    return '; '.join(notes) or None


def _write_tar(out: str, path: str, left_out: Dict[str, str]) -> None:
    """``out`` into a gzipped tar at ``path``, without the files of
    ``left_out``, whose lines make the tar's ``LEFT_OUT``."""
    arcname = osp.basename(osp.normpath(out))
    skipped = {osp.relpath(p, osp.dirname(osp.normpath(out))) for p in left_out}
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(out, arcname=arcname,
                filter=lambda info: None if info.name in skipped else info)
        if left_out:
            text = ''.join(left_out.values()).encode()
            info = tarfile.TarInfo(f'{arcname}/{LEFT_OUT}')
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))


def junit_counts(path: str) -> Optional[Dict[str, int]]:
    """{tests, skipped, failed} of a pytest JUnit XML (None: none there)."""
    import xml.etree.ElementTree as ElementTree
    if not osp.exists(path):
        return None
    suites = ElementTree.parse(path).getroot().iter('testsuite')
    counts = dict(tests=0, skipped=0, failed=0)
    for suite in suites:
        counts['tests'] += int(suite.get('tests', 0))
        counts['skipped'] += int(suite.get('skipped', 0))
        counts['failed'] += int(suite.get('failures', 0)) + int(suite.get('errors', 0))
    return counts


def run_in_group(command: Sequence[str], log, env: Dict[str, str], timeout: float
                 ) -> Optional[int]:
    """``command``'s exit status (the command, then its output, into
    ``log``), or None where it ran past ``timeout``: then its whole process
    group is stopped (ncu's, compute-sanitizer's and
    torchrun's children would hold the GPU otherwise)."""
    log.write('$ ' + ' '.join([f'{k}={v}' for k, v in env.items()] + list(command)) + '\n')
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, **env), start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return None
    except Stopped:  # the run itself is ending: so must its step
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``'s whole process group, then SIGKILL after a grace."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


class Stopped(BaseException):
    """The run received SIGTERM (a ``BaseException``: no step's handler swallows it)."""


def _raise_stopped(signum, frame) -> None:
    raise Stopped()


def record_items(path: str) -> Tuple[int, List[str]]:
    """What a step's JSON record says of its items (0 and [] where there is
    no record): how many its budget left out, and each row's error (a
    ``status``, ``error`` or ``errors`` entry of ``describe_error``'s form).
    A case records a row that fails and goes on, exit 0; where a GPU fault
    broke the CUDA context, every later row fails too."""
    if not osp.exists(path):
        return 0, []
    with open(path) as f:
        try:
            record = json.load(f)
        except ValueError:
            return 0, []
    skipped, errors = 0, []

    def walk(node, key=None) -> None:
        nonlocal skipped
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, key if key == 'errors' else k)  # {'errors': {row: why}}
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str):
            skipped += node.startswith(SKIPPED_FOR_TIME)
            if key in ROW_ERROR_KEYS and node.startswith(ROW_ERROR):
                errors.append(node)

    walk(record)
    return skipped, errors


class Session:
    """One run of ``steps`` into ``out``.

    Args:
        out: the results folder (created; a resume reads it).
        steps: the steps, in order.
        deadline: when this run must end, in ``clock`` seconds; None: never.
        python: the interpreter of the steps' ``{python}``.
        dry_run: run the steps' CPU checks.
        speed: the card's speed against an H200 (``steps.gpu_speed``).
        tar: pack ``out`` here after every step that ran (None: not).
        tar_limit: the tar's most bytes (None: no limit; see ``pack``).
        retry_failed: a resume runs failed steps again.
        clock: seconds since the epoch (a test's fake).
    """

    def __init__(self, out: str, steps: Sequence[Step], deadline: Optional[float],
                 python: str = sys.executable, dry_run: bool = False, speed: float = 1.0,
                 tar: Optional[str] = None, tar_limit: Optional[int] = None,
                 retry_failed: bool = False,
                 clock: Callable[[], float] = time.time):
        self.out = osp.abspath(out)
        if tar and osp.abspath(tar).startswith(self.out + os.sep):
            raise UsageError(f'--tar {tar} lies inside --out {out}: it would pack itself')
        self.steps = list(steps)
        self.deadline = deadline
        self.python = python
        self.dry = dry_run
        self.speed = speed
        self.tar = tar
        self.tar_limit = tar_limit
        self.clock = clock
        os.makedirs(self.out, exist_ok=True)
        progress = read_progress(self.out)
        self.kept = finished(progress, retry_failed)
        self.partial = partial_tries(progress)
        self.start = clock()
        self.lines: List[Dict] = []

    def left(self) -> float:
        return float('inf') if self.deadline is None else self.deadline - self.clock()

    def timeout(self, left: float, need: float) -> float:
        """A step's timeout: twice its estimate and a slack, within what is left."""
        return min(left, DRY_TIMEOUT_S if self.dry else need * TIMEOUT_FACTOR + TIMEOUT_SLACK_S)

    def path(self, template: str, suffix: str = '') -> str:
        """A step's file, its placeholders filled."""
        return expand([template], self.python, self.out, [], suffix=suffix)[0]

    def need(self, step: Step) -> float:
        """Its estimate for this card; twice that where a try of it was partial."""
        return step.estimate_s / self.speed * (2 if self.partial.get(step.name) else 1)

    def tuned(self) -> List[str]:
        """The tune records in ``out`` now (a later step's ``{tuned}``)."""
        return sorted(osp.join(self.out, name) for name in os.listdir(self.out)
                      if name.startswith('tune_') and name.endswith('.json'))

    def record(self, step: Step, status: str, **fields) -> Dict:
        fields = {k: (None if isinstance(v, float) and v == float('inf') else v)
                  for k, v in fields.items()}  # no limit: JSON has no infinity
        line = dict(step=step.name, status=status, dry_run=self.dry, **fields)
        self.lines.append(line)
        path = osp.join(self.out, PROGRESS)
        # a line cut short by a kill must not swallow this one
        torn = osp.exists(path) and osp.getsize(path) > 0 and not _ends_with_newline(path)
        with open(path, 'a') as f:
            f.write(('\n' if torn else '') + json.dumps(line, default=str) + '\n')
            f.flush()
            os.fsync(f.fileno())
        seconds = fields.get('seconds')
        print(f'[gpu] {step.name:32s} {status}' + (f' in {seconds:.0f} s' if seconds else ''),
              flush=True)
        return line

    def pack(self) -> None:
        if self.tar:
            note = pack(self.out, self.tar, self.tar_limit)
            if note:
                print(f'[gpu] packing {self.out} into {self.tar}: {note}', flush=True)

    def run(self) -> int:
        """Every step in order; 1 where one failed or timed out in this run, or
        the run was stopped (SIGTERM), else 0."""
        failed = False
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_stopped) if main else None
        step, lines_before = None, 0
        try:
            for step in self.steps:
                if step.name in self.kept:
                    print(f'[gpu] {step.name:32s} kept from an earlier run: '
                          f'{self.kept[step.name]}')
                    continue
                lines_before = len(self.lines)
                failed |= self.run_step(step)
        except Stopped:
            failed = True
            # a step whose planned attempt was recorded keeps its outcome
            if step is not None and len(self.lines) == lines_before:
                self.record(step, 'timed out: the run was stopped (SIGTERM)')
        finally:
            if main:  # a handler set from C reads as None: the default stands for it
                signal.signal(signal.SIGTERM,
                              signal.SIG_DFL if previous is None else previous)
        self.pack()
        self.summary()
        return 1 if failed else 0

    def run_step(self, step: Step) -> bool:
        """Run ``step`` (and its rerun on PyTorch); whether it failed."""
        left, need = self.left(), self.need(step)
        if left < need:
            self.record(step, f'skipped: {max(left, 0):.0f} s left, needs about {need:.0f} s',
                        left_s=left)
            return False
        argv = step.dry_argv if self.dry else step.argv
        env = dict(step.dry_env if self.dry else step.env)
        if argv is None:
            shown = ' '.join(expand(step.argv, self.python, self.out, self.tuned()))
            self.record(step, 'dry-run: shown, not run (needs the GPU host\'s tools)',
                        command=shown)
            return False
        status = self.attempt(step, argv, env, left, need, 'as planned')
        self.pack()
        bad = not status.startswith(('ok', 'not run', 'partial'))
        if bad and step.reruns_on_torch and not self.dry and NO_FAULT not in status:
            left = self.left()
            if left < need:
                self.record(step, f'skipped: its rerun on PyTorch ({left:.0f} s left)',
                            attempt='on PyTorch')
            else:
                self.attempt(step, argv, dict(env, **{FORCE_ENV: 'torch'}), left, need,
                             'on PyTorch')
                self.pack()
        return bad

    def attempt(self, step: Step, argv: Sequence[str], env: Dict[str, str], left: float,
                need: float, attempt: str) -> str:
        timeout = self.timeout(left, need)
        suffix = '' if attempt == 'as planned' else '.torch'
        # the step's own time, less a margin to write its record, as a case's --budget-s
        budget = max(timeout - TIMEOUT_SLACK_S / 2, 1.0)
        tuned = self.tuned()
        command = expand(argv, self.python, self.out, tuned, budget, suffix)
        log_path = osp.join(self.out, step.name.replace('/', '_') + suffix + '.log')
        if shutil.which(command[0]) is None:
            return self.record(step, f'not run: {command[0]} is not on PATH here',
                               command=' '.join(command), attempt=attempt)['status']
        begin = self.clock()
        with open(log_path, 'w') as log:
            rc = run_in_group(command, log, env, timeout)
            written = step.report is None or osp.exists(self.path(step.report, suffix))
            if rc == 0 and written and step.then and not self.dry:  # the report's details page
                then = expand(step.then, self.python, self.out, tuned, budget, suffix)
                # reading a report back is quick: a step that used its time still gets
                # some, within the run's deadline
                rc = run_in_group(then, log, {}, max(
                    timeout - (self.clock() - begin), min(THEN_LEAST_S, self.left()), 1.0))
        seconds = self.clock() - begin
        status = self.outcome(step, rc, timeout, suffix)
        fields = dict(seconds=seconds, limit_s=timeout, left_s=left, attempt=attempt,
                      command=' '.join(command), log=osp.basename(log_path))
        if not status.startswith('ok'):
            with open(log_path, errors='replace') as log:
                fields.update(diagnose(log.read(), MEMORY_KERNELS))
        self.record(step, status, **fields)
        return status

    def outcome(self, step: Step, rc: Optional[int], timeout: float, suffix: str) -> str:
        """A finished process's status: its exit, then what it must have left."""
        if rc is None:
            return f'timed out after {timeout:.0f} s'
        if rc != 0:
            return f'failed (exit {rc})'
        if self.dry:
            return 'ok (dry run)'
        if step.report:
            report = self.path(step.report, suffix)
            if not osp.exists(report):
                return f'failed: no {osp.basename(report)} written (nothing profiled?)'
        if step.junit:
            counts = junit_counts(self.path(step.junit, suffix))
            if counts is None or counts['tests'] - counts['skipped'] == 0:
                return f'failed: no test ran ({counts})'
        if step.record:
            skipped, errors = record_items(self.path(step.record, suffix))
            if errors:
                fault = [e for e in errors if GPU_FAULT.search(e)]
                return (f'failed: {len(errors)} rows failed'
                        + ('' if fault else f' ({NO_FAULT})')
                        + f', the first with {(fault or errors)[0][:200]}')
            if skipped:
                return f'partial: {skipped} items skipped for time'
        return 'ok'

    def summary(self) -> None:
        """The steps of this run, a line each."""
        print(f'[gpu] {len(self.lines)} results in {self.clock() - self.start:.0f} s '
              f'into {self.out}')
        for line in self.lines:
            extra = ''
            if line.get('error') or line.get('kernels_named'):
                extra = f"  <- {line.get('error')} {line.get('kernels_named') or ''}"
            print(f"  {line['step']:32s} {line['status'][:60]}{extra}")


def select(steps: Sequence[Step], only: Sequence[str], skip: Sequence[str]) -> List[Step]:
    """The steps named, or of the groups named, by ``only`` (all where
    empty), less those of ``skip``; an unknown name is an error."""
    known = {s.name for s in steps} | {s.group for s in steps}
    unknown = [name for name in list(only) + list(skip) if name not in known]
    if unknown:
        raise UsageError(f'unknown steps or groups {unknown}; known groups: '
                         f"{sorted({s.group for s in steps})}")

    def named(step: Step, names: Sequence[str]) -> bool:
        return step.name in names or step.group in names

    return [s for s in steps if (not only or named(s, only)) and not named(s, skip)]


def _ends_with_newline(path: str) -> bool:
    with open(path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b'\n'


def host_torch_is_pinned() -> bool:
    """Whether this torch is the one ``requirements/torch.txt`` pins, read by
    the installer's own reader (``tools/setup`` is scripts, not a package)."""
    import importlib.util

    import torch
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        'convneur_setup_common', osp.join(repo, 'tools', 'setup', 'setup_common.py'))
    setup_common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_common)
    pins = setup_common.read_pins(osp.join(repo, 'requirements', 'torch.txt'))
    return torch.__version__.split('+')[0] == pins.get('torch')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gpu`` case's options."""
    parser.add_argument('--out', required=True, help='the results folder (a resume reads it)')
    parser.add_argument('--limit-s', type=positive_float,
                        help='seconds this run may take from its start (default: no limit)')
    parser.add_argument('--deadline', type=positive_float, metavar='EPOCH_S',
                        help='when this run must end, in seconds since the epoch (a caller '
                        "that spent some of its time already: gpu_run.sh's install)")
    parser.add_argument('--only', nargs='+', default=[], metavar='STEP',
                        help='only these steps or groups (e.g. correctness tune/m3)')
    parser.add_argument('--skip', nargs='+', default=[], metavar='STEP')
    parser.add_argument('--retry-failed', action='store_true',
                        help='a resume runs the failed steps again too')
    parser.add_argument('--tar', help='pack the results folder here after every step')
    parser.add_argument('--tar-limit-mib', type=positive_float, default=TAR_LIMIT_MIB,
                        help='the tar\'s most MiB: the largest profiler reports are left out '
                        f'until it fits (default {TAR_LIMIT_MIB}: a GPU host returns files of '
                        'at most 16 MiB)')
    parser.add_argument('--ncu-kernels', nargs='+', default=list(NCU_KERNELS), metavar='KERNEL')
    parser.add_argument('--tune-limit-s', type=positive_int, default=60)
    parser.add_argument('--no-mmcv-ops', action='store_true',
                        help="mmcv's CUDA ops are not installed: leave out the tests that need them")
    parser.add_argument('--list', action='store_true', help='print the steps and stop')


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """The session of the chosen steps; its lines are the record."""
    from benchmarks.kernels.tune import OP_OF
    bad = [k for k in args.ncu_kernels if k not in OP_OF]
    if bad:
        raise UsageError(f'--ncu-kernels: unknown kernels {bad}; known: {list(OP_OF)}')
    steps = select(gpu_steps(host_torch_is_pinned(), args.ncu_kernels, args.tune_limit_s,
                             not args.no_mmcv_ops), args.only, args.skip)
    if args.list:
        width = max(len(step.name) for step in steps) if steps else 0
        for step in steps:
            print(f'{step.name:{width}s} {step.estimate_s:5.0f} s  {step.summary}')
        return dict(steps=[s.name for s in steps])
    speed, device = 1.0, 'cpu (dry run)'
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            raise UsageError('the gpu case runs on a CUDA GPU; --dry-run checks it on a CPU')
        device = torch.cuda.get_device_name()
        speed = gpu_speed(device)
    deadline = args.deadline
    if args.limit_s is not None:
        deadline = min(deadline or math.inf, time.time() + args.limit_s)
    left = 'no limit' if deadline is None else f'{deadline - time.time():.0f} s left'
    print(f'[gpu] {len(steps)} steps on {device} (speed {speed:g} of an H200), {left}, '
          f'into {args.out}', flush=True)
    session = Session(args.out, steps, deadline, dry_run=args.dry_run, speed=speed,
                      tar=args.tar, tar_limit=int(args.tar_limit_mib * 2**20),
                      retry_failed=args.retry_failed)
    code = session.run()
    return dict(device=device, speed=speed, lines=session.lines,
                progress=osp.join(session.out, PROGRESS), exit_code=code)
