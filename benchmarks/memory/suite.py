"""The neural memory's GPU benchmark: every section of ``memory_sections``
in one run, one JSON record that is rewritten after every section (a run cut
short keeps what it measured), one time budget, and the memory's targets.

The budget is the run's deadline: before each item a section asks
``MemorySuite.why_not(kind)``, which compares the time left with what the
last item of that kind took, and records ``skipped: budget ...`` where it
would not fit. ``dry_run`` runs every section a CPU can run at tiny sizes
(batch 2, 32x32 images, chunks of 16 tokens so that stage 1 still writes, one
timed call; ``torch.compile`` with the ``eager`` backend, tracing only); the
CUDA-only items record ``skipped: needs CUDA``.
"""
import datetime
import importlib.util
import json
import math
import os
import os.path as osp
import platform
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from convneur_mm.analysis.timing import setup_benchmark_device
from benchmarks.common.memory_models import (LOCAL_ONLY, build_classifier, global_branches,
                                                hooked_inputs)
from benchmarks.common.subjects import (TRAINING_MODE, backbone_memory_keys,
                                                  describe_error, free, supported_memory_keys)

SCHEMA = 'convneur_mm.gpu_memory_bench/1'
SECTIONS = ('gemm', 'branch', 'model', 'numerics', 'latency', 'compiled', 'profile')
# the profile repeats what the others time, under the profiler: asked for on its own
DEFAULT_SECTIONS = SECTIONS[:-1]
DEFAULT_BUDGET_S = 450.0  # a GPU run's default; a dry run has none unless asked

# Tiny sizes for the CPU dry run; the speed table's protocol on the GPU. The dry
# run's 32x32 images give stage 1 64 tokens: chunks of 16 (instead of the
# config's 196) keep its write path, 3 written chunks, in every section.
SIZES = {
    'full': dict(batch=128, image=224, iters=10, warmup=2, rounds=6, latency_iters=50,
                 numerics_batch=8, chunk_size=None),
    'dry': dict(batch=2, image=32, iters=1, warmup=0, rounds=1, latency_iters=1,
                numerics_batch=2, chunk_size=16),
}


class Budget:
    """The run's deadline (``seconds`` from now; None: none); ``why_not(needs)``
    says why an item that needs that long must be skipped, or None where it fits."""

    def __init__(self, seconds: Optional[float]):
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        """Seconds to the deadline (negative past it; inf without one)."""
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.monotonic() - self.start)

    def why_not(self, needs: float) -> Optional[str]:
        left = self.left()
        if left >= needs:
            return None
        return f'skipped: budget ({max(left, 0):.0f} s left, needs about {needs:.0f} s)'


def environment(device: str, description: str) -> Dict:
    """Versions, the device and its state, the commit: what the figures need beside them."""
    info = dict(description=description, python=platform.python_version(),
                torch=torch.__version__, cuda=torch.version.cuda, host=platform.node(),
                cpu_count=os.cpu_count(), memory_keys=supported_memory_keys(),
                backbone_memory_keys=backbone_memory_keys())
    for name in ('triton', 'mmcv', 'mmengine', 'mmpretrain'):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 (recorded, not needed)
            info[name] = describe_error(exc)
    try:
        info['mmcv_ops'] = importlib.util.find_spec('mmcv._ext') is not None
    except (ImportError, ValueError):
        info['mmcv_ops'] = False
    try:
        info['commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'],
                                        cwd=osp.dirname(osp.abspath(__file__)), text=True,
                                        capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info['commit'] = None
    if device.startswith('cuda'):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, capability='%d.%d' % (props.major, props.minor),
                    multiprocessors=props.multi_processor_count,
                    gpu_memory_gib=props.total_memory / 2**30)
        try:
            info['nvidia_smi'] = subprocess.run(
                ['nvidia-smi', '--query-gpu=name,driver_version,clocks.sm,clocks.mem,'
                 'clocks.max.sm,power.limit,temperature.gpu', '--format=csv,noheader'],
                text=True, capture_output=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info['nvidia_smi'] = describe_error(exc)
    try:
        from convneur_mm.models.layers.memory_ops.kernels import unavailable_reason
        info['memory_kernels'] = {
            str(dtype).replace('torch.', ''): unavailable_reason(
                torch.device(device), 128, dtype) or 'available'
            for dtype in (torch.float32, torch.bfloat16)}
    except Exception as exc:  # noqa: BLE001 (an older commit has no kernels)
        info['memory_kernels'] = describe_error(exc)
    return info


class MemorySuite:
    """What the sections share: the device, sizes, budget, models and log."""

    def __init__(self, out_path: Optional[str], dry_run: bool = False,
                 batch: Optional[int] = None, budget_s: Optional[float] = None):
        self.out_path = out_path
        self.dry = dry_run
        self.device = 'cpu' if self.dry else 'cuda'
        self.cuda = self.device == 'cuda'
        self.sizes = dict(SIZES['dry' if self.dry else 'full'])
        if batch:
            self.sizes['batch'] = batch
        self.budget = Budget(budget_s)
        self.last_s: Dict[str, float] = {}
        self.logs: List[str] = []
        self.memory_keys: Optional[List[str]] = None
        self.result: Dict = dict(schema=SCHEMA, dry_run=self.dry, sizes=self.sizes,
                                 budget_s=budget_s, sections={})

    def why_not(self, kind: str) -> Optional[str]:
        """Why the next item of ``kind`` must be skipped (the last one of that
        kind took longer than the time left), or None."""
        return self.budget.why_not(self.last_s.get(kind, 0.0))

    def measured(self, kind: str, start: float) -> None:
        """Record the seconds since ``start`` as the cost of an item of ``kind``."""
        self.last_s[kind] = time.monotonic() - start

    def log(self, text: str) -> None:
        self.logs.append(text)
        print(text, file=sys.stderr, flush=True)

    def checkpoint(self, partial: Dict) -> None:
        """Save the running section's results so far: a run killed before the
        section ends keeps them, marked as cut off."""
        self.result['sections'][self.section] = dict(
            partial, status='error: cut off before the section ended (partial results)',
            seconds=time.monotonic() - self.section_start)
        self.write()

    def write(self) -> None:
        """The JSON so far (atomically: a run killed mid-write leaves the last one)."""
        self.result['elapsed_s'] = time.monotonic() - self.budget.start
        if self.out_path is None:
            return
        tmp = self.out_path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.result, f, indent=1, allow_nan=True)
        os.replace(tmp, self.out_path)

    def setup(self) -> None:
        """Describe the environment, build M3 and local-only, record the
        branches' inputs."""
        import convneur_mm.models  # noqa: F401 (registers the backbone)
        description = setup_benchmark_device(self.device)  # TF32 off on CUDA
        self.memory_keys = supported_memory_keys()
        self.result['environment'] = environment(self.device, description)
        torch.manual_seed(0)
        self.m3 = build_classifier(self.device, self.sizes['chunk_size'])
        self.local_only = build_classifier(self.device, self.sizes['chunk_size'], LOCAL_ONLY)
        self.m3_branches = global_branches(self.m3)
        if len(self.m3_branches) != 4 or global_branches(self.local_only):
            raise RuntimeError(f'expected M3 with 4 global branches and local-only with none, '
                               f'got {len(self.m3_branches)} and '
                               f'{len(global_branches(self.local_only))}')
        x = torch.randn(self.sizes['batch'], 3, self.sizes['image'], self.sizes['image'],
                        device=self.device)
        self.branch_inputs = hooked_inputs(self.m3, x, self.m3_branches)
        # tokens per image at stage 1, from the memory's own input
        (tokens, ) = hooked_inputs(self.m3, x[:1], [self.m3_branches[0].memory])
        self.stage1_tokens = tokens.shape[1]


def run_sections(ctx: MemorySuite, sections: Sequence[str]) -> None:
    """Each of ``SECTIONS`` asked for, in order, its record saved after it."""
    for name in SECTIONS:
        if name not in sections:
            ctx.result['sections'][name] = dict(status='skipped: not asked for (--sections)')
            continue
        start = ctx.section_start = time.monotonic()
        ctx.section = name
        ctx.checkpoint({})  # a run killed inside the section says so
        print(f'[memory] {name} ({ctx.budget.left():.0f} s left)', file=sys.stderr,
              flush=True)
        try:
            rec = section_fns()[name](ctx)
            rec.setdefault('status', 'ok')
        except Exception as exc:  # noqa: BLE001
            rec = dict(status=describe_error(exc))
            ctx.log(traceback.format_exc())
        rec['seconds'] = time.monotonic() - start
        ctx.result['sections'][name] = rec
        ctx.write()
        free(ctx.device)


def statuses(node, path: str = '') -> List[Tuple[str, str]]:
    """Every (path, status) in the result tree."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get('status'), str):
            found.append((path or '/', node['status']))
        for key, value in node.items():
            found += statuses(value, f'{path}/{key}')
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += statuses(value, f'{path}/{i}')
    return found


def check_schema(result: Dict) -> List[str]:
    """What is wrong with the result's form (empty: nothing)."""
    problems = []
    for key in ('schema', 'dry_run', 'sizes', 'budget_s', 'sections', 'environment',
                'elapsed_s'):
        if key not in result:
            problems.append(f'missing top-level key {key!r}')
    if result.get('schema') != SCHEMA:
        problems.append(f'schema is {result.get("schema")!r}, not {SCHEMA!r}')
    sections = result.get('sections', {})
    for name in SECTIONS:
        if not isinstance(sections.get(name), dict):
            problems.append(f'section {name!r} missing')
        elif not isinstance(sections[name].get('seconds'), (int, float)) and \
                not sections[name].get('status', '').startswith('skipped: not asked'):
            problems.append(f'section {name!r} has no seconds')
    for path, status in statuses(sections):
        if status != 'ok' and not status.startswith(('skipped: ', 'error: ')):
            problems.append(f'{path}: status {status!r} is not ok, skipped: or error:')
    try:
        json.loads(json.dumps(result))
    except (TypeError, ValueError) as exc:
        problems.append(f'not JSON: {exc}')
    return problems


def _get(node, *keys):
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def targets(result: Dict) -> Dict[str, Dict]:
    """The memory's GPU targets, with this run's figures where it measured
    them (bf16 autocast, batch 128, 224², ratios against local-only). 2577
    img/s: M3 under bf16 autocast on an H100 before the tensor-core memory
    (docs/notes/benchmarks.md)."""
    s = result['sections']
    rows = {}

    def put(name, value, target, ok=None):
        rows[name] = dict(value=value, target=target,
                          met=None if value is None or ok is None else bool(ok(value)))

    bf16 = _get(s, 'model', 'modes', 'bf16_autocast')
    f32 = _get(s, 'model', 'modes', 'float32')
    put('four branches ms per batch, bf16 eager inference', _get(bf16, 'branches_ms'), '<= 3',
        lambda v: v <= 3)
    put('four branches ms per training step, bf16 eager',
        _get(s, 'branch', 'rows', TRAINING_MODE, 'ms'), '<= 15', lambda v: v <= 15)
    put('branch overhead over local-only, bf16 eager',
        _get(bf16, 'overhead_over_local'), '<= 0.20', lambda v: v <= 0.20)
    put('branch overhead over local-only, bf16 compiled',
        _get(s, 'compiled', 'modes', 'bf16_autocast', 'overhead_over_local'), '<= 0.50',
        lambda v: v <= 0.50)
    put('training step overhead over local-only, bf16 eager',
        _get(s, 'model', 'modes', TRAINING_MODE, 'overhead_over_local'), '<= 0.40',
        lambda v: v <= 0.40)
    put('M3 img/s, bf16 eager', _get(bf16, 'models', 'M3', 'images_per_s'),
        '>= 2 x 2577 (H100, before)', lambda v: v >= 2 * 2577)
    m3_bf16, m3_f32 = _get(bf16, 'models', 'M3', 'ms'), _get(f32, 'models', 'M3', 'ms')
    put('M3 bf16 speed-up over M3 float32',
        m3_f32 / m3_bf16 if m3_bf16 and m3_f32 else None, '>= 1.8', lambda v: v >= 1.8)
    for mode, row in (('bf16', bf16), ('float32', f32)):
        m3p = _get(row, 'models', 'M3', 'peak_growth_mib')
        lop = _get(row, 'models', 'M3 local-only', 'peak_growth_mib')
        put(f'peak inference memory over local-only, {mode}',
            m3p / lop if m3p and lop else None, '<= 1.2', lambda v: v <= 1.2)
    put('batch-1 latency over local-only, CUDA graph, bf16',
        _get(s, 'latency', 'rows', 'ratio bf16_autocast', 'graph'), '<= 1.3',
        lambda v: v <= 1.3)
    put('logits relative error against float32, bf16',
        _get(s, 'numerics', 'logits', 'rows', 'bf16_autocast', 'error_vs_float32'), '<= 0.01',
        lambda v: v <= 0.01)
    put('update-contribution error at max_lr 1e-3, bf16 autocast',
        _get(s, 'numerics', 'memory', 'rows', 'max_lr=0.001', 'bf16_autocast', 'update_error'),
        '<= 0.01', lambda v: v <= 0.01)
    return rows


def print_summary(result: Dict) -> None:
    print('\n[memory] targets (bf16 autocast, batch %d):' % result['sizes']['batch'])
    for name, row in result['targets'].items():
        value = row['value']
        shown = '-' if value is None else f'{value:.4g}'
        met = {True: 'met', False: 'NOT met', None: ''}[row['met']]
        print(f'  {name:58s} {shown:>10s}  target {row["target"]:28s} {met}')
    failed = [(p, st) for p, st in statuses(result['sections']) if st.startswith('error: ')]
    skipped = [(p, st) for p, st in statuses(result['sections']) if st.startswith('skipped: ')]
    print(f'[memory] {len(skipped)} items skipped, {len(failed)} failed')
    for path, status in failed:
        print(f'  FAILED {path}: {status[:300]}')


def section_fns() -> Dict:
    from benchmarks.memory.sections import SECTION_FNS
    return SECTION_FNS


def check_writable(path: str) -> None:
    """Fail at start, not after minutes of measuring, if ``path`` cannot be written."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    probe = path + '.probe'
    with open(probe, 'w') as f:
        f.write('{}')
    os.remove(probe)


def run(out_path: Optional[str], sections: Sequence[str] = DEFAULT_SECTIONS, dry_run: bool = False,
        batch: Optional[int] = None, budget_s: Optional[float] = None,
        argv: Optional[Sequence[str]] = None) -> Tuple[int, Dict]:
    """Run the asked ``sections``; print the targets and what failed.

    Args:
        out_path: the JSON file, rewritten after every section (None: none).
        sections: which of ``SECTIONS`` to run (the rest are recorded as not asked for).
        dry_run: tiny sizes on the CPU (else CUDA, which must be there).
        batch: the throughput batch instead of the default (128; dry run 2).
        budget_s: seconds the whole run may take (None: ``DEFAULT_BUDGET_S``
            on a GPU, no limit in a dry run).
        argv: the command line, recorded in the JSON.

    Returns:
        The exit status (0: no item failed and the JSON has its schema; 1
        otherwise) and the result.
    """
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f'unknown sections {unknown}; known: {SECTIONS}')
    if budget_s is None and not dry_run:
        budget_s = DEFAULT_BUDGET_S
    ctx = MemorySuite(out_path, dry_run, batch, budget_s)
    ctx.result['started'] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    ctx.result['argv'] = list(argv or [])
    try:
        ctx.setup()
    except Exception as exc:  # noqa: BLE001 (recorded; nothing else can run)
        ctx.log(traceback.format_exc())
        ctx.result['setup'] = describe_error(exc)
        ctx.result.setdefault('environment', {})
        for name in SECTIONS:
            ctx.result['sections'][name] = dict(status='skipped: set-up failed', seconds=0.0)
        ctx.write()
        print(f'[memory] set-up failed: {exc}', file=sys.stderr)
        return 1, ctx.result
    ctx.result['setup'] = 'ok'
    ctx.write()
    run_sections(ctx, sections)
    ctx.result['targets'] = targets(ctx.result)
    problems = check_schema(ctx.result)
    ctx.result['schema_problems'] = problems
    ctx.write()
    print_summary(ctx.result)
    failed = [st for _, st in statuses(ctx.result['sections']) if st.startswith('error: ')]
    for problem in problems:
        print(f'[memory] schema: {problem}', file=sys.stderr)
    return (1 if failed or problems else 0), ctx.result
