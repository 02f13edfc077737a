"""The memory's kernels compiled ahead of time for an NVIDIA GPU, as a stage
launches them, and what the compiler made of each (``inspect.CompileReport``):
registers, spills, shared memory, and each matrix product's layout, with the
products that a layout computes more than once (warps laid past a tile's
rows or columns). No GPU is needed: the launches are recorded on meta
tensors and triton's own ptxas compiles them. The calls 'branch' and
'branch step' run a whole global branch of the stage (its projections and
scan too), in inference and in a training step.

    python -m benchmarks.run aot                       # M3's stage 1, bf16, sm_90
    python -m benchmarks.run aot --calls branch 'branch step' --stage 3
    python -m benchmarks.run aot --gpu-arch 80 --calls read 'read step'
    python -m benchmarks.run aot --calls read --force read BM=128 num_warps=8
    python -m benchmarks.run aot --calls 'branch step' --force project_backward num_warps=4
    python -m benchmarks.run aot --dry-run             # the tiny shape, the read only
    python -m benchmarks.run aot --dry-run --calls 'branch step'  # M3's stage 1 at batch 2
    python -m benchmarks.run aot --job cascade-m3      # a config's shapes, its branch
    python -m benchmarks.run aot --calls 'project step' --operand-dtype float32
"""
import argparse
import dataclasses
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from benchmarks.common.record import Record, UsageError
from benchmarks.common.subjects import M3_SIZE, branch_inputs
from benchmarks.kernels.profile import global_branches, job_shapes
from benchmarks.kernels.tune import (DRY_SHAPE, OPERAND_DTYPES, add_stage_arguments, stage_calls,
                                     stage_shape)
from benchmarks.memory.bytes import MemoryShape
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested
from convneur_mm.models.layers.memory_ops.kernels.tiles import TUNED_KERNELS, forced_tiles_of
from convneur_mm.utils.cli import positive_int

CALLS = ('write', 'read', 'write step', 'read step')
# the projections alone (the tuner's calls too), compiled only where asked
PROJECTION_CALLS = ('project', 'project step')
BRANCH_CALLS = ('branch', 'branch step')


def branch_calls(arch: str, stage: int, batch: int, operand_dtype: str,
                 memory_cfg: Optional[dict] = None,
                 size: Union[int, Tuple[int, int]] = M3_SIZE) -> Dict[str, Callable[[], None]]:
    """'branch' and 'branch step': the first global branch of ``arch``'s
    ``stage`` on meta tensors through the kernels with ``operand_dtype``
    operands (and ``memory_cfg``'s other settings), in inference and in a
    training step (forward and backward), at ``batch`` images of ``size``
    (the speed protocol's side by default; as ``profile.kernel_rooflines``
    records them: the memory computes in float32 whatever the autocast)."""
    branches = [found for found in global_branches('meta', 'triton', operand_dtype, arch,
                                                   memory_cfg)
                if found[0] == stage][:1]
    x, = branch_inputs(branches, batch, size, 'meta')  # every stage has one
    branch = branches[0][1]

    def inference() -> None:
        with torch.inference_mode():
            branch(x)

    def step() -> None:  # on meta tensors the backward's launches are recorded too
        branch(x.detach().requires_grad_()).float().sum().backward()

    return {'branch': inference, 'branch step': step}


def stage_reports(shape: MemoryShape, operand_dtype: torch.dtype, arch: int,
                  calls: Sequence[str] = CALLS,
                  forced: Optional[Dict[str, Dict[str, int]]] = None,
                  branch: Optional[Callable[[], Dict[str, Callable[[], None]]]] = None
                  ) -> List:
    """A ``CompileReport`` per distinct launch that ``calls`` (the tuner's:
    the write's and the read's forward and training steps; with ``branch``,
    which makes ``branch_calls``, also 'branch' and 'branch step') make at
    ``shape``, compiled for sm_``arch``; ``forced``: ``{kernel: options}``
    launched instead of their defaults (``tiles.forced_tiles_of``)."""
    from benchmarks.kernels import inspect
    made = {}  # built only where asked: a stage of one chunk has no write to call
    if set(calls) & set(CALLS + PROJECTION_CALLS):
        made.update(stage_calls(shape, operand_dtype, 'meta').triton)
    if set(calls) & set(BRANCH_CALLS):
        made.update(branch())
    with forced_tiles_of(forced or {}), inspect.recording_launches(arch) as launches:
        for name in calls:
            made[name]()
    return inspect.launch_reports(launches, arch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``aot`` case's options."""
    add_stage_arguments(parser)
    parser.add_argument('--gpu-arch', type=positive_int, default=90,
                        help='the compute capability compiled for (major * 10 + minor)')
    parser.add_argument('--calls', nargs='+', choices=CALLS + PROJECTION_CALLS + BRANCH_CALLS,
                        default=None,
                        help=f'the launches to compile (default: {" ".join(CALLS)})')
    from benchmarks.training.throughput import JOBS
    parser.add_argument('--job', choices=sorted(JOBS),
                        help="a real config's shapes for the 'branch' calls (the default "
                             'calls then): its backbone, memory settings, per-GPU batch and '
                             'largest training image')
    parser.add_argument('--force', nargs='+', action='append', default=[],
                        metavar='KERNEL KEY=VALUE',
                        help="a kernel's launch options instead of its defaults, e.g. "
                        '--force read BM=128 num_warps=8 (repeatable)')


def forced_options(force: Sequence[Sequence[str]]) -> Dict[str, Dict[str, int]]:
    """``--force``'s groups as ``{kernel: {option: value}}``.

    Raises:
        UsageError: an unknown kernel, or an option not KEY=integer.
    """
    forced = {}
    for kernel, *pairs in force:
        if kernel not in TUNED_KERNELS:
            raise UsageError(f'--force: unknown kernel {kernel!r}; known: '
                             f'{", ".join(TUNED_KERNELS)}')
        options = {}
        for pair in pairs:
            key, _, value = pair.partition('=')
            if not re.fullmatch(r'[0-9]+', value):
                raise UsageError(f'--force {kernel}: {pair!r} is not KEY=integer')
            options[key] = int(value)
        forced[kernel] = options
    return forced


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``stage_reports`` with the parsed options, a line per kernel launch;
    a dry run compiles the read's forward at the tuner's tiny shape."""
    job = job_shapes(args.job) if args.job else None
    if job and not set(args.calls or BRANCH_CALLS) <= set(BRANCH_CALLS):
        raise UsageError(f"--job takes the calls {' '.join(BRANCH_CALLS)}: a whole branch at "
                         "the config's shapes")
    if args.dry_run:  # the read unless --calls names others
        shape, calls = DRY_SHAPE, args.calls or ['read']
    elif job:
        args.arch = job['arch']
        shape, calls = stage_shape(args), args.calls or list(BRANCH_CALLS)
    else:
        shape, calls = stage_shape(args), args.calls or list(CALLS)
    if interpreter_requested():
        raise UsageError('aot compiles the kernels: start it without TRITON_INTERPRET')
    if shape.writes == 0 and set(calls) & set(CALLS + PROJECTION_CALLS):
        raise UsageError(f'stage {args.stage} of {args.arch} holds one chunk and writes nothing: '
                         f"--calls {' '.join(CALLS + PROJECTION_CALLS)} need a write; 'branch' "
                         "and 'branch step' compile what it runs")
    from benchmarks.kernels.inspect import _triton
    try:
        _triton()
    except RuntimeError as err:  # a triton without an ahead-of-time compiler
        raise UsageError(str(err)) from err
    forced = forced_options(args.force)
    try:  # an option forced_tiles refuses, before anything compiles
        with forced_tiles_of(forced):
            pass
    except ValueError as err:
        raise UsageError(str(err)) from err
    batch, stage = (DRY_SHAPE.batch, 0) if args.dry_run else (args.batch, args.stage)
    memory_cfg, size = None, M3_SIZE
    if job and not args.dry_run:
        batch, memory_cfg, size = job['batch'], job['memory_cfg'], job['size']
    reports = stage_reports(shape, OPERAND_DTYPES[args.operand_dtype], args.gpu_arch, calls,
                            forced, lambda: branch_calls(args.arch, stage, batch,
                                                         args.operand_dtype, memory_cfg, size))
    for report in reports:
        print(report)
        for product in report.products:
            print(f'    {product}')
    return dict(shape=shape._asdict(), operand_dtype=args.operand_dtype, arch=args.gpu_arch,
                calls=list(calls), forced=forced, reports=[_as_dict(r) for r in reports])


def _as_dict(report) -> Dict:
    out = dataclasses.asdict(report)
    out['products'] = [dict(dataclasses.asdict(p), copies=p.copies) for p in report.products]
    return out
