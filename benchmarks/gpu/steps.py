"""The steps of the GPU run (``python -m benchmarks.run gpu``), in the order a
lease runs them: the forward, backward and projection kernels' correctness,
Nsight Compute and compute-sanitizer on them (a first lease reaches them
after its install), the rest of the correctness checks, the tuning, then the
figures.

Each step is one process (a GPU fault breaks the CUDA context of the
process it happens in, and nothing else), with its seconds estimated on an
H200 from the first run (Triton's compilation included; ``GPU_SPEED`` scales
them for other cards). A step whose process may launch the memory's kernels
through a memory's own plan (``reruns_on_torch``) is run again with
``CONVNEUR_MEMORY_IMPLEMENTATION=torch`` when it fails: the PyTorch path's
figures, and the failure, stay on record.

Arguments may hold ``{python}``, ``{out}`` (the results folder),
``{budget}`` (the step's seconds, as a case's ``--budget-s``) and the token
``{tuned}``, which becomes ``--tuned FILE...`` with the tune records already
in the results folder (nothing where there are none).
"""
import dataclasses
from typing import List, Optional, Sequence, Tuple

from benchmarks.common.subjects import BRANCH_VARIANTS
from convneur_mm.models.layers.memory_ops.kernels.tiles import KERNEL_NAMES

MEMORY_OPS_TESTS = 'tests/test_models/test_memory_ops'
# the kernels furthest from their roofline at M3's stage 1 on an H200 (benchmark
# notes): three forward, two backward; ``--ncu-kernels`` names others
NCU_KERNELS = ('grads_rows', 'read', 'grads_cols', 'read_backward_rows',
               'grads_backward_rows')
NCU_SECTIONS = ('SpeedOfLight', 'MemoryWorkloadAnalysis', 'MemoryWorkloadAnalysis_Tables',
                'Occupancy', 'WarpStateStats', 'SourceCounters', 'LaunchStats')
# the card's speed against an H200 on these steps (an H100 has 0.7x its memory
# bandwidth; the rest, compilation included, is about the same): estimates / speed
GPU_SPEED = {'H200': 1.0, 'H100': 0.8}
UNKNOWN_GPU_SPEED = 0.6
# the memory's Triton kernels, as a failed step's log may name them (``<name>_kernel``)
MEMORY_KERNELS = KERNEL_NAMES + ('project', 'project_backward', 'scan', 'scan_backward')
# tests/conftest.py runs a ``gpu`` test in this process where this is set (no child per test)
GPU_CHILD = (('CONVNEUR_TEST_GPU_CHILD', '1'), )
# the kernels' checks on a CPU run in Triton's interpreter
INTERPRETER = (('TRITON_INTERPRET', '1'), )
# memcheck sees an access past a tensor only where no cached block lies there
NO_ALLOCATOR_CACHE = (('PYTORCH_NO_CUDA_MEMORY_CACHING', '1'), )


@dataclasses.dataclass(frozen=True)
class Step:
    """One process of the GPU run.

    Args:
        name: 'group/what', unique; the group is the part before the slash.
        summary: what it measures or checks, in a line.
        argv: its command line (placeholders: see the module docstring).
        estimate_s: seconds on an H200, Triton's compilation included.
        dry_argv: its check on a CPU (``--dry-run``), or None where a CPU can
            only show the command (Nsight Compute, compute-sanitizer).
        reruns_on_torch: a failure reruns it on the PyTorch path.
        env: variables set for it.
        dry_env: variables set for its check on a CPU.
        report: a file it must write (else it failed, whatever its exit).
        junit: its JUnit XML: it failed where no test in it ran.
        record: its JSON record: failed where a row's status is an error, else
            partial where it says items were skipped for time.
        then: a command run after it succeeds, into the same log.
    """
    name: str
    summary: str
    argv: Tuple[str, ...]
    estimate_s: float
    dry_argv: Optional[Tuple[str, ...]] = None
    reruns_on_torch: bool = False
    env: Tuple[Tuple[str, str], ...] = ()
    dry_env: Tuple[Tuple[str, str], ...] = ()
    report: Optional[str] = None
    junit: Optional[str] = None
    record: Optional[str] = None
    then: Optional[Tuple[str, ...]] = None

    @property
    def group(self) -> str:
        return self.name.split('/')[0]


def _lab(*args: str) -> Tuple[str, ...]:
    return ('{python}', '-m', 'benchmarks.run') + args


def _pytest(*args: str) -> Tuple[str, ...]:
    return ('{python}', '-m', 'pytest', '-p', 'no:cacheprovider', '-rA') + args


# the correctness steps before the profilers: the kernels they profile, and the
# projections and gates beneath every call (a first lease then reaches ncu and memcheck)
FIRST_CHECKS = ('correctness/forward', 'correctness/backward', 'correctness/project')


def correctness_steps() -> List[Step]:
    """The kernels against float64 on CUDA, forward and backward, at M3's and
    M4's widths: one process per test file, the read's last (its 64-row
    variant is the one known to fault)."""
    cases = (('forward', 'test_kernels.py', 'on_cuda_at_model_widths and not backward and '
              '(128 or 160)', 'the forward kernels in every operand dtype', 60),
             ('backward', 'test_kernels.py', '(backward_kernels_on_cuda and (128 or 160)) or '
              'trains_on_cuda', 'the backward kernels, and a memory trained with them', 75),
             ('project', 'test_project.py test_gates.py', '128 or 160', 'the projection '
              'kernel and its backward, and the gates kernel', 75),
             ('tiles', 'test_tiles.py test_dispatch.py', '', 'persistent programs, and '
              "'auto' where measured", 30),
             ('read', 'test_read.py', '', "the read's backward under its launch variants, "
              '64-row tiles included', 100))
    steps = []
    for name, files, keys, summary, seconds in cases:
        paths = tuple(f'{MEMORY_OPS_TESTS}/{f}' for f in files.split())
        select = ('-k', keys) if keys else ()
        junit = f'{{out}}/correctness_{name}.xml'
        steps.append(Step(f'correctness/{name}', summary,
                          _pytest('-m', 'gpu', *paths, *select, '--junitxml', junit),
                          seconds, dry_argv=_pytest('-m', 'gpu', *paths, *select,
                                                    '--collect-only', '-q'),
                          env=GPU_CHILD, junit=junit))
    return steps


# the real configs whose bf16 reads are decomposed (max_lr below DECOMPOSE_BELOW_MAX_LR),
# one per width: their entries are the decomposed kind, keyed by width, not by job
DECOMPOSED_TUNE_JOBS = ('cascade-m3', 'upernet-m4')


def tune_steps(limit_s: int = 60) -> List[Step]:
    """Every kernel the tuner knows, forward and backward, at M3's stage 1
    (C_m 128) and M4's (160 columns), bf16; each stops trying candidates at
    ``limit_s`` and then times the calls once more."""
    return [Step(f'tune/{arch}', f"launch options by timing at {arch.upper()}'s stage 1, "
                 'beside the PyTorch path',
                 _lab('tune', '--arch', arch, '--stage', '0', '--limit-s', str(limit_s),
                      '--json', f'{{out}}/tune_{arch}.json'), limit_s + 50,
                 dry_argv=_lab('tune', '--dry-run', '--rounds', '1',
                               '--json', f'{{out}}/tune_{arch}.json'),
                 dry_env=INTERPRETER)
            for arch in ('m3', 'm4')]


def decomposed_tune_steps(limit_s: int = 60) -> List[Step]:
    """The decomposed read's kernels at ``DECOMPOSED_TUNE_JOBS``' stage 1
    (``tune --job``), half ``limit_s`` of candidates each: after the other
    tuning, before the bench."""
    limit = max(1, limit_s // 2)
    return [Step(f'tune/{job}', f"the decomposed read's launch options at {job}'s stage 1",
                 _lab('tune', '--job', job, '--stage', '0', '--limit-s', str(limit),
                      '--json', f'{{out}}/tune_{job}.json'), limit + 40,
                 dry_argv=_lab('tune', '--dry-run', '--job', job, '--kernels', 'read',
                               '--rounds', '1', '--json', f'{{out}}/tune_{job}.json'),
                 dry_env=INTERPRETER)
            for job in DECOMPOSED_TUNE_JOBS]


def ncu_steps(kernels: Sequence[str] = NCU_KERNELS) -> List[Step]:
    """One launch of each kernel under Nsight Compute, with the tuned entries,
    clocks left alone, into ``ncu_<kernel>.ncu-rep``; then the report's
    details page, read back from it, into the log. A run that profiled no
    launch writes no report, and fails."""
    steps = []
    for kernel in kernels:
        report = f'{{out}}/ncu_{kernel}'
        sections = [arg for name in NCU_SECTIONS for arg in ('--section', name)]
        launch = _lab('launch', kernel, '{tuned}')
        steps.append(Step(
            f'ncu/{kernel}', f'Nsight Compute on one {kernel}_kernel launch at M3\'s stage 1',
            ('ncu', '--clock-control', 'none', '--target-processes', 'all',
             '--profile-from-start', 'off', '--kernel-name', f'regex:^{kernel}_kernel',
             '--launch-count', '1', *sections, '--export', report, '--force-overwrite',
             *launch), 35,
            dry_argv=_lab('launch', kernel, '--dry-run'), dry_env=INTERPRETER,
            report=report + '.ncu-rep',
            then=('ncu', '--import', report + '.ncu-rep', '--page', 'details')))
    return steps


def sanitizer_steps(kernel: str = 'read_backward_rows', rows: int = 64) -> List[Step]:
    """compute-sanitizer's memcheck and racecheck on ``kernel`` at ``rows``-row
    tiles, at a small batch (the tools slow a launch by orders of magnitude).
    PyTorch's caching allocator is off: memcheck sees an access past a tensor
    only where no other block of a cached segment lies there; the API errors
    that PyTorch and Triton expect (an event not ready) are not reported."""
    return [Step(f'sanitizer/{tool}', f'compute-sanitizer {tool} on {kernel} at {rows}-row tiles',
                 _sanitized(tool, 'launch', kernel, '--rows', str(rows), '--batch', '4',
                            '--warmup', '0'),
                 45, dry_argv=_lab('launch', kernel, '--rows', str(rows), '--dry-run'),
                 env=NO_ALLOCATOR_CACHE, dry_env=INTERPRETER)
            for tool in ('memcheck', 'racecheck')]


def _sanitized(tool: str, *lab_args: str) -> Tuple[str, ...]:
    """A lab command under compute-sanitizer's ``tool``: exit 9 on an error it
    finds, the API errors PyTorch and Triton expect (an event not ready) unreported."""
    return ('compute-sanitizer', '--tool', tool, '--error-exitcode', '9',
            '--report-api-errors', 'no', '--print-limit', '20', *_lab(*lab_args))


def repro_steps() -> List[Step]:
    """The minimal kernel standing for the read's backward rows pass
    (``benchmarks.kernels.repro``): every launch variant, a process each, then
    memcheck on the pass's default at 64 rows. Faults and wrong results are
    its findings (recorded, exit 0): a fault here and not in our kernel's
    code says the compiler's."""
    one = ('--rows', '64', '--warps', '8', '--stages', '2')
    return [Step('sanitizer/repro', 'the minimal chained-product kernel at 64, 32 and 16 rows '
                 'against float64', _lab('repro', '--json', '{out}/repro.json'), 65,
                 dry_argv=_lab('repro', '--dry-run', *one), dry_env=INTERPRETER),
            Step('sanitizer/repro-memcheck', 'compute-sanitizer memcheck on the minimal kernel '
                 'at 64-row tiles', _sanitized('memcheck', 'repro', *one), 30,
                 dry_argv=_lab('repro', '--dry-run', *one), env=NO_ALLOCATOR_CACHE,
                 dry_env=INTERPRETER)]


def launches_kernels(variant: str) -> bool:
    """Whether a memory variant's plan may take the Triton kernels on a GPU:
    it asks for them, or leaves 'auto' to decide with 16-bit operands (the
    only ones measured paths exist for)."""
    cfg, context, _, _ = BRANCH_VARIANTS[variant]
    implementation = cfg.get('implementation', 'auto')
    return implementation == 'triton' or (implementation == 'auto' and (
        context == 'bf16' or cfg.get('operand_dtype') in ('bfloat16', 'float16')))


def bench_steps() -> List[Step]:
    """The memory suite with the tuned entries: the branch variants that may
    launch kernels one per process, training first, the others together;
    then M3 against local-only, numerics, batch-1 latency, compiled."""
    kernel_variants = sorted((v for v in BRANCH_VARIANTS if launches_kernels(v)),
                             key=lambda v: not BRANCH_VARIANTS[v][2])
    others = [v for v in BRANCH_VARIANTS if not launches_kernels(v)]

    def memory(name: str, summary: str, seconds: float, sections: Sequence[str],
               variants: Sequence[str] = ()) -> Step:
        args = ['--sections', *sections] + (['--variants', *variants] if variants else [])
        json_path = f'{{out}}/bench_{name}.json'
        return Step(f'bench/{name}', summary,
                    _lab('memory', *args, '{tuned}', '--budget-s', '{budget}',
                         '--json', json_path), seconds,
                    dry_argv=_lab('memory', '--dry-run', *args, '--json', json_path),
                    reruns_on_torch=True, record=json_path)

    steps = [memory(f'branch-{v}', f'the four branches as {v}', 20, ['branch'], [v])
             for v in kernel_variants]
    steps.append(memory('branch-others', 'the four branches on the PyTorch path and in '
                        'float32', 45, ['gemm', 'branch'], others))
    steps += [memory('model', 'M3 against local-only, eager, inference and a bf16 training '
                     'step', 45, ['model']),
              memory('numerics', 'logits and the memory against float64', 30, ['numerics']),
              memory('latency', 'batch 1, eager and CUDA graphs', 25, ['latency']),
              memory('compiled', 'M3 against local-only through torch.compile, with the '
                     'kernels as custom operators', 140, ['compiled'])]
    return steps


def later_steps(torch_pinned: bool, mmcv_ops: bool = True) -> List[Step]:
    """What the lease after the first one's steps measures: the kernels
    under the profiler, the GPU tests still to confirm, training (fp16 with
    the peers, bf16 and compiled against local-only), and 16-bit against
    float32 training."""
    pinned = '' if torch_pinned else ' and not torch_pinned'
    # the fp16 detector step and RoIAlign need mmcv's CUDA ops
    keys = 'graph_breaks or fp16_amp or roi_align' if mmcv_ops else 'graph_breaks'
    tests = _pytest('-m', f'gpu{pinned}', 'tests', 'projects', '-k', keys,
                    '--continue-on-collection-errors', '--junitxml', '{out}/tests.xml')
    return [
        Step('profile/kernels', 'device time per kernel beside its roofline (torch.profiler)',
             _lab('memory', '--sections', 'profile', '{tuned}', '--budget-s', '{budget}',
                  '--json', '{out}/profile.json'),
             60, dry_argv=_lab('memory', '--dry-run', '--sections', 'profile',
                               '--json', '{out}/profile.json'),
             record='{out}/profile.json'),
        Step('tests/package', 'the GPU tests still to confirm: graph breaks under bf16 '
             "autocast, the fp16 detector step, RoIAlign (torch_pinned: on the pinned torch)",
             tests, 150, dry_argv=tests[:-2] + ('--collect-only', '-q'), env=GPU_CHILD,
             junit='{out}/tests.xml'),
        Step('train/configs', "training iterations of the real configs beside their peers, "
             "and with NonFiniteStopHook (fp16 autocast, as tools/train.py --amp)",
             _lab('train', '--device', 'cuda', '--amp', '--eval', '--guarded',
                  '--json', '{out}/train.json'),
             260, dry_argv=_lab('train', '--dry-run', '--guarded', '--json', '{out}/train.json'),
             reruns_on_torch=True, record='{out}/train.json'),
        Step('train/bf16', 'the real configs against local-only under bf16 autocast '
             '(--amp-dtype bfloat16), beside the fp16 rows, ConvNeur on its default path '
             'and on the Triton kernels',
             _lab('train', '--device', 'cuda', '--amp', '--amp-dtype', 'bfloat16', '--peers',
                  'local-only', 'kernels', '--json', '{out}/train_bf16.json'),
             150, dry_argv=_lab('train', '--dry-run', '--jobs', 'cls-m3', '--peers',
                                'local-only', 'kernels', '--json', '{out}/train_bf16.json'),
             reruns_on_torch=True, record='{out}/train_bf16.json'),
        Step('train/compiled', 'the ImageNet and ADE20K configs against local-only, all '
             'compiled as tools/train.py --compile compiles them (bf16 autocast), ConvNeur '
             'on its default path and with the kernels in its graph',
             _lab('train', '--device', 'cuda', '--amp', '--amp-dtype', 'bfloat16',
                  '--compile', '--jobs', 'cls-m3', 'fpn-m3', 'upernet-m4', '--peers',
                  'local-only', 'kernels', '--json', '{out}/train_compiled.json'),
             400, dry_argv=_lab('train', '--dry-run', '--compile', '--jobs', 'cls-m3',
                                '--peers', 'local-only', 'kernels',
                                '--json', '{out}/train_compiled.json'),
             reruns_on_torch=True, record='{out}/train_compiled.json'),
        Step('precision/m1', 'bf16 and fp16 against float32 training, M1 on the tiny ImageNet, '
             'three seeds', _lab('precision', '--work-dir', '{out}/precision_runs',
                                 '--precisions', 'float32', 'bfloat16', 'float16',
                                 '--json', '{out}/precision.json'), 360,
             dry_argv=_lab('precision', '--dry-run', '--work-dir', '{out}/precision_runs',
                           '--json', '{out}/precision.json'),
             record='{out}/precision.json'),
    ]


def gpu_steps(torch_pinned: bool = True, ncu_kernels: Sequence[str] = NCU_KERNELS,
              tune_limit_s: int = 60, mmcv_ops: bool = True) -> List[Step]:
    """Every step, in order (see the module docstring).

    Args:
        torch_pinned: the host's torch is the one ``requirements/torch.txt``
            pins (else the tests that pin torch internals are left out).
        ncu_kernels: the kernels Nsight Compute profiles.
        tune_limit_s: seconds each tuning run tries candidates.
        mmcv_ops: mmcv's CUDA ops are installed (else the tests that need
            them are left out).
    """
    correctness = correctness_steps()
    first = [s for s in correctness if s.name in FIRST_CHECKS]
    steps = (first + ncu_steps(ncu_kernels) + sanitizer_steps() +
             [s for s in correctness if s not in first] + repro_steps() +
             tune_steps(tune_limit_s) + decomposed_tune_steps(tune_limit_s) + bench_steps() +
             later_steps(torch_pinned, mmcv_ops))
    names = [s.name for s in steps]
    assert len(set(names)) == len(names), names
    return steps


def gpu_speed(device_name: Optional[str]) -> float:
    """``GPU_SPEED`` of a card by its name (``UNKNOWN_GPU_SPEED`` where none matches)."""
    for card, speed in GPU_SPEED.items():
        if device_name and card in device_name:
            return speed
    return UNKNOWN_GPU_SPEED


def expand(argv: Sequence[str], python: str, out: str, tuned: Sequence[str],
           budget_s: Optional[float] = None, suffix: str = '') -> List[str]:
    """``argv`` with its placeholders filled; ``suffix`` goes before the
    extension of each JSON or XML file in ``{out}`` (a rerun's records stand
    beside the first attempt's)."""
    expanded: List[str] = []
    for arg in argv:
        if arg == '{tuned}':
            expanded += ['--tuned', *tuned] if tuned else []
            continue
        if suffix and arg.startswith('{out}/') and arg.endswith(('.json', '.xml')):
            stem, _, ext = arg.rpartition('.')
            arg = f'{stem}{suffix}.{ext}'
        arg = arg.replace('{python}', python).replace('{out}', out)
        if '{budget}' in arg:
            arg = arg.replace('{budget}', '0' if budget_s is None else f'{budget_s:.0f}')
        expanded.append(arg)
    return expanded
