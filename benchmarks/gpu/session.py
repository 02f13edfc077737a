"""The GPU run (the ``gpu`` case): ``steps.gpu_steps`` under one time limit,
each step in a process of its own, saved as it goes and resumable.

    python -m benchmarks.run gpu --out gpu_results [--limit-s 480] [--only GROUP|STEP ...]
    python -m benchmarks.run gpu --out /tmp/plan --dry-run --only correctness tune/m3

* **Saved as it goes.** After every step a line goes to
  ``OUT/progress.jsonl`` (the step, its status, seconds, the command, its
  log) and, with ``--tar``, the whole folder is packed again; the steps'
  own JSON records are rewritten after each of their cases. A run killed at
  any point keeps every finished step.
* **A fault takes one step.** A step that fails is diagnosed from its log
  (the last error line, the kernels it names); one whose memories plan
  their own path (``Step.reruns_on_torch``) is run again with
  ``CONVNEUR_MEMORY_IMPLEMENTATION=torch``, and both results are kept.
* **No step starts without its time.** A step starts only where the time
  left holds its estimate (scaled by ``steps.gpu_speed`` for the card), and
  runs under a timeout of twice that; else it is recorded as skipped.
* **A resume runs only what is missing.** Run again with the same ``--out``:
  steps already ok or failed are kept; skipped, timed-out and never-run
  steps run (``--retry-failed`` runs the failed ones again too).
* **Dry mode.** ``--dry-run`` runs each step's CPU check instead (the lab's
  dry runs, pytest's collection, the kernels in Triton's interpreter) under
  the same bookkeeping; Nsight Compute and compute-sanitizer are only shown.

The exit status is 1 where a step of this run failed, else 0.
"""
import argparse
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import tarfile
import time
from typing import Callable, Dict, List, Optional, Sequence

from benchmarks.common.record import Record, UsageError
from benchmarks.gpu.steps import NCU_KERNELS, Step, expand, gpu_speed, gpu_steps
from convneur_mm.models.layers.memory_ops.dispatch import FORCE_ENV
from convneur_mm.utils.cli import positive_float, positive_int

PROGRESS = 'progress.jsonl'
TIMEOUT_FACTOR = 2.0
TIMEOUT_SLACK_S = 30.0
DRY_TIMEOUT_S = 900.0  # a CPU's check has no GPU estimate to go by
# statuses a resume runs again: the step did not finish
MISSING = ('skipped', 'timed out', 'not run')
_KERNEL = re.compile(r'\b(\w+_kernel)\b')
_ERROR = re.compile(r'^(\w+(Error|Exception)|CUDA error|RuntimeError|AssertionError|FAILED|'
                    r'=+ (Invalid|Race|ERROR)).*', re.M)


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
    """{step: status} of the steps a resume keeps."""
    kept = {}
    for line in progress:
        status = line['status']
        if status.startswith(MISSING) or line.get('dry_run'):
            continue  # a dry run's checks are no GPU results
        if retry_failed and not status.startswith('ok'):
            continue
        kept.setdefault(line['step'], status)
    return kept


def diagnose(log: str) -> Dict[str, object]:
    """The last error line of a failed step's log and the kernels it names."""
    errors = [m.group(0) for m in _ERROR.finditer(log)]
    named = sorted(set(_KERNEL.findall(log[-20000:])))
    return dict(error=errors[-1][:300] if errors else None, kernels_named=named)


def pack(out: str, tar_path: str) -> None:
    """``out`` as a gzipped tar at ``tar_path``, atomically."""
    tmp = tar_path + '.tmp'
    with tarfile.open(tmp, 'w:gz') as tar:
        tar.add(out, arcname=osp.basename(osp.normpath(out)))
    os.replace(tmp, tar_path)


class Session:
    """One run of ``steps`` into ``out``.

    Args:
        out: the results folder (created; a resume reads it).
        steps: the steps, in order.
        limit_s: seconds this run may take; None: no limit.
        python: the interpreter of the steps' ``{python}``.
        dry_run: run the steps' CPU checks.
        speed: the card's speed against an H200 (``steps.gpu_speed``).
        tar: pack ``out`` here after every step (None: not).
        retry_failed: a resume runs failed steps again.
        clock: seconds, monotonic (a test's fake).
    """

    def __init__(self, out: str, steps: Sequence[Step], limit_s: Optional[float],
                 python: str = sys.executable, dry_run: bool = False, speed: float = 1.0,
                 tar: Optional[str] = None, retry_failed: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.out = osp.abspath(out)
        self.steps = list(steps)
        self.limit_s = limit_s
        self.python = python
        self.dry = dry_run
        self.speed = speed
        self.tar = tar
        self.clock = clock
        os.makedirs(self.out, exist_ok=True)
        self.kept = finished(read_progress(self.out), retry_failed)
        self.start = clock()
        self.lines: List[Dict] = []

    def left(self) -> float:
        if self.limit_s is None:
            return float('inf')
        return self.limit_s - (self.clock() - self.start)

    def timeout(self, left: float, need: float) -> float:
        """A step's timeout: twice its estimate and a slack, within what is left."""
        return min(left, DRY_TIMEOUT_S if self.dry else need * TIMEOUT_FACTOR + TIMEOUT_SLACK_S)

    def need(self, step: Step) -> float:
        return step.estimate_s / self.speed

    def tuned(self) -> List[str]:
        """The tune records in ``out`` now (a later step's ``{tuned}``)."""
        return sorted(osp.join(self.out, name) for name in os.listdir(self.out)
                      if name.startswith('tune_') and name.endswith('.json'))

    def record(self, step: Step, status: str, **fields) -> Dict:
        fields = {k: (None if isinstance(v, float) and v == float('inf') else v)
                  for k, v in fields.items()}  # no limit: JSON has no infinity
        line = dict(step=step.name, status=status, dry_run=self.dry, **fields)
        self.lines.append(line)
        with open(osp.join(self.out, PROGRESS), 'a') as f:
            f.write(json.dumps(line, default=str) + '\n')
            f.flush()
            os.fsync(f.fileno())
        seconds = fields.get('seconds')
        print(f'[gpu] {step.name:32s} {status}' + (f' in {seconds:.0f} s' if seconds else ''),
              flush=True)
        if self.tar:
            pack(self.out, self.tar)
        return line

    def run(self) -> int:
        """Every step in order; 1 where one failed in this run, else 0."""
        failed = False
        for step in self.steps:
            if step.name in self.kept:
                print(f'[gpu] {step.name:32s} kept from an earlier run: {self.kept[step.name]}')
                continue
            failed |= self.run_step(step)
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
        if status.startswith('failed') and step.reruns_on_torch and not self.dry:
            left = self.left()
            if left < need:
                self.record(step, f'skipped: its rerun on PyTorch ({left:.0f} s left)',
                            attempt='on PyTorch')
            else:
                self.attempt(step, argv, dict(env, **{FORCE_ENV: 'torch'}), left, need,
                             'on PyTorch')
        return status.startswith('failed')

    def attempt(self, step: Step, argv: Sequence[str], env: Dict[str, str], left: float,
                need: float, attempt: str) -> str:
        command = expand(argv, self.python, self.out, self.tuned())
        suffix = '' if attempt == 'as planned' else '.torch'
        log_path = osp.join(self.out, step.name.replace('/', '_') + suffix + '.log')
        if shutil.which(command[0]) is None:
            return self.record(step, f'not run: {command[0]} is not on PATH here',
                               command=' '.join(command), attempt=attempt)['status']
        timeout = self.timeout(left, need)
        begin = self.clock()
        with open(log_path, 'w') as log:
            log.write('$ ' + ' '.join(f'{k}={v}' for k, v in env.items()) +
                      ' '.join(command) + '\n')
            log.flush()
            try:
                rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, **env), timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = self.clock() - begin
        if rc is None:
            status = f'timed out after {timeout:.0f} s'
        elif rc == 0:
            status = 'ok' if not self.dry else 'ok (dry run)'
        else:
            status = f'failed (exit {rc})'
        fields = dict(seconds=seconds, limit_s=timeout, left_s=left, attempt=attempt,
                      command=' '.join(command), log=osp.basename(log_path))
        if rc != 0:
            with open(log_path, errors='replace') as log:
                fields.update(diagnose(log.read()))
        self.record(step, status, **fields)
        return status

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


def host_torch_is_pinned() -> bool:
    """Whether this torch is the one ``requirements/torch.txt`` pins."""
    import torch
    pin_file = osp.join(osp.dirname(__file__), '..', '..', 'requirements', 'torch.txt')
    with open(pin_file) as f:
        pins = dict(re.findall(r'^(\w+)=+([\w.+]+)', f.read(), re.M))
    return torch.__version__.split('+')[0] == pins.get('torch')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gpu`` case's options."""
    parser.add_argument('--out', required=True, help='the results folder (a resume reads it)')
    parser.add_argument('--limit-s', type=positive_float,
                        help='seconds this run may take (default: no limit)')
    parser.add_argument('--only', nargs='+', default=[], metavar='STEP',
                        help='only these steps or groups (e.g. correctness tune/m3)')
    parser.add_argument('--skip', nargs='+', default=[], metavar='STEP')
    parser.add_argument('--retry-failed', action='store_true',
                        help='a resume runs the failed steps again too')
    parser.add_argument('--tar', help='pack the results folder here after every step')
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
        for step in steps:
            print(f'{step.name:32s} {step.estimate_s:5.0f} s  {step.summary}')
        return dict(steps=[s.name for s in steps])
    speed, device = 1.0, 'cpu (dry run)'
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            raise UsageError('the gpu case runs on a CUDA GPU; --dry-run checks it on a CPU')
        device = torch.cuda.get_device_name()
        speed = gpu_speed(device)
    print(f'[gpu] {len(steps)} steps on {device} (speed {speed:g} of an H200), limit '
          f"{args.limit_s or 'none'} s, into {args.out}", flush=True)
    session = Session(args.out, steps, args.limit_s, dry_run=args.dry_run, speed=speed,
                      tar=args.tar, retry_failed=args.retry_failed)
    code = session.run()
    return dict(device=device, speed=speed, lines=session.lines,
                progress=osp.join(session.out, PROGRESS), exit_code=code)
