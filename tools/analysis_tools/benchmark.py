"""Benchmarks of ConvNeur, one task per call.

    python tools/analysis_tools/benchmark.py --task TASK [options] [--json PATH]
    python tools/analysis_tools/benchmark.py --task TASK --help   # the task's options

Tasks (the measuring code is in convneur_mm/analysis/):
  speed          throughput, latency, peak memory of ConvNeur and its peers
                 (speed.py), with the GEMM-rate bound of M3
  compile        eager against torch.compile: inference, a backbone training
                 step, a detector training step (compiled.py)
  onnx           batch-1 latency of eager, compiled and ONNX Runtime (onnx_latency.py)
  resolution     backbone time and peak memory against input size (resolution.py)
  memory         the neural memory's cost: its branch against the autograd
                 reference (paths), a backbone's inference memory (backbone),
                 the GPU sections (memory_sections.py: gemm branch model
                 numerics latency compiled)
  checkpointing  training memory: with_cp and the memory's recompute, or the
                 per-GPU ImageNet batch that fits a card (training_memory.py)
  train          training iterations of the real configs (train_throughput.py)
  precision      16-bit against float32 training from the same seeds: loss
                 curves and top-1 (precision_training.py; exit 1 where they disagree)

Every task prints its report and, with --json, writes its result there.
--dry-run runs a task at tiny sizes on the CPU (a check, not a measurement).
"""
import argparse
import json
import os
import os.path as osp
import sys
import tempfile
from typing import Callable, Dict, List, Optional

import torch

from convneur_mm.utils.cli import (non_negative_float, positive_float, positive_int,
                                   writable_dir, writable_file)
from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings

TASKS = ('speed', 'compile', 'onnx', 'resolution', 'memory', 'checkpointing', 'train',
         'precision')
MEMORY_SECTIONS = ('paths', 'backbone', 'gemm', 'branch', 'model', 'numerics', 'latency',
                   'compiled', 'profile')


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')


def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument('--dry-run', action='store_true', help='tiny sizes on the CPU')


def speed_arguments(p: argparse.ArgumentParser) -> None:
    from convneur_mm.analysis.speed import MODELS, MODES
    _device(p)
    _dry_run(p)
    p.add_argument('--models', nargs='+', choices=list(MODELS), help='default: all')
    p.add_argument('--modes', nargs='+', default=['eager'], choices=MODES)
    p.add_argument('--batch', type=positive_int, help='throughput batch (CPU 16, CUDA 128)')
    p.add_argument('--iters', type=positive_int, default=3, help='timed iterations')
    p.add_argument('--rounds', type=positive_int, default=1, help='measure every model this '
                   'many times, in turns, and keep each one\'s best round')
    p.add_argument('--size', type=positive_int, default=224, help='image side')


def speed(args: argparse.Namespace) -> Dict:
    from convneur_mm.analysis import speed as lib
    from convneur_mm.analysis.timing import peak_gemm_rate, setup_benchmark_device
    device = setup_benchmark_device(args.device)  # workers inherit the malloc tuning
    if args.dry_run:
        args.models = args.models or ['ConvNeur-M1']
        args.batch, args.iters, args.size = args.batch or 1, 1, 64
    batch = lib.throughput_batch(args.device, args.batch)
    results = lib.run_all(args.models or list(lib.MODELS), args.modes, args.device, batch,
                          args.iters, args.rounds, args.size, log=_log)
    gemm_rate = peak_gemm_rate(args.device, 256 if args.dry_run else 2048)
    print(lib.report(results, device, batch, gemm_rate, args.size))
    return dict(device=device, batch=batch, gemm_flops_per_s=gemm_rate, results=results)


def compile_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.training.compiled import WORKLOADS
    from convneur_mm.analysis.speed import MODELS
    _device(p)
    _dry_run(p)
    p.add_argument('--workloads', nargs='+', default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument('--models', nargs='+', default=['ConvNeur-M3'], choices=list(MODELS),
                   help='the inference workload\'s classifiers')
    p.add_argument('--repeats', type=positive_int, default=3)
    p.add_argument('--amp', action='store_true')
    p.add_argument('--batch', type=positive_int, help='inference batch (CPU 16, CUDA 128)')
    p.add_argument('--profile', action='store_true',
                   help='profile one eager and one compiled call: where the time goes')
    p.add_argument('--profile-rows', type=int, default=0,
                   help='with --profile, also print the N events with most self time')


def compile_(args: argparse.Namespace) -> Dict:
    from benchmarks.training import compiled as lib
    from convneur_mm.analysis.timing import setup_benchmark_device
    from convneur_mm.analysis.speed import throughput_batch
    device = setup_benchmark_device(args.device)
    dry = args.dry_run  # tiny images, M1, Dynamo tracing only (the 'eager' backend)
    batch = 1 if dry else throughput_batch(args.device, args.batch)
    builders: Dict[str, Callable] = {}
    for name in args.workloads:
        if name == 'inference':
            for model in args.models:
                builders[f'inference {model}'] = (lambda model=model: lib.inference_workload(
                    model, args.device, batch, 64 if dry else 224))
        elif name == 'train':
            builders['train'] = lambda: lib.train_workload(
                args.device, *(('m1', 1, 64) if dry else ()))
        else:
            builders['detector'] = lambda: lib.detector_workload(
                args.device, (128, 128) if dry else (800, 1333))
    print(f'eager vs torch.compile on {device}' + (', under autocast' if args.amp else '')
          + f'; median of {args.repeats} interleaved runs')
    results = lib.run_workloads(builders, args.repeats, args.device, args.amp,
                                args.profile_rows if args.profile else None,
                                'eager' if dry else 'inductor', log=_log)
    print(lib.comparison_table(results))
    return dict(device=device, amp=args.amp, results=results)


def onnx_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.training.compiled import ONNX_MODELS as MODELS
    _dry_run(p)
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--repeats', type=positive_int, default=5)
    p.add_argument('--out-dir', type=writable_dir,
                   help='keep the .onnx files here (default: a temporary folder)')


def onnx(args: argparse.Namespace) -> Dict:
    from benchmarks.training import compiled as lib
    from convneur_mm.analysis.timing import setup_benchmark_device
    device = setup_benchmark_device('cpu')
    models, size = (['m1'], 64) if args.dry_run else (args.models, None)
    repeats = 1 if args.dry_run else args.repeats
    print(f'batch-1 latency on {device}; median of {repeats} interleaved runs')
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            results.append(lib.measure_onnx(name, repeats, args.out_dir or tmp, size,
                                       'eager' if args.dry_run else 'inductor'))
            _log(f'measured {name}')
    print(lib.onnx_table(results))
    return dict(device=device, results=results)


def resolution_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.paper.resolution import MODELS
    _device(p)
    _dry_run(p)
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--sizes', type=positive_int, nargs='+', default=[224, 512, 1024, 1536, 2048])
    p.add_argument('--max-forward-s', type=positive_float, default=120.0,
                   help='skip sizes predicted to take longer per forward')
    p.add_argument('--max-memory-mb', type=positive_float, default=12000.0,
                   help='skip sizes predicted to need more peak memory')
    p.add_argument('--iters', type=positive_int, default=2)
    p.add_argument('--out-dir', type=writable_dir, default='work_dirs/resolution_scaling',
                   help='where the figure goes')


def resolution(args: argparse.Namespace) -> Dict:
    from benchmarks.paper import resolution as lib
    from convneur_mm.analysis.timing import setup_benchmark_device
    device = setup_benchmark_device(args.device)  # workers inherit the malloc tuning
    if args.dry_run:
        args.models, args.sizes, args.iters = ['ConvNeur-M3 local-only'], [32, 64], 1
    results = lib.run_all(args.models, args.sizes, args.device, args.iters, args.max_forward_s,
                          args.max_memory_mb, detection_size=not args.dry_run, log=_log)
    summary = lib.summarize(results)
    print(f'Device: {device}\n\n{lib.table(results, summary)}')
    os.makedirs(args.out_dir, exist_ok=True)
    figure = osp.join(args.out_dir, 'resolution_scaling.png')
    lib.plot(results, figure, device)
    print(f'\nplot: {figure}')
    return dict(device=device, results=results, summary=summary, figure=figure)


def memory_arguments(p: argparse.ArgumentParser) -> None:
    _device(p)
    p.add_argument('--sections', nargs='+', default=['paths'], choices=MEMORY_SECTIONS,
                   help='paths, backbone (CPU), or the GPU sections (see memory_sections.py)')
    p.add_argument('--dry-run', action='store_true',
                   help='tiny sizes on the CPU (also the GPU sections)')
    p.add_argument('--batch', type=positive_int,
                   help='paths 8, backbone 8, GPU sections 128 (dry run 2)')
    p.add_argument('--repeats', type=positive_int, default=7,
                   help='timed turns (paths) or forwards per process (backbone)')
    p.add_argument('--tokens', type=positive_int, default=56 * 56, help='paths')
    p.add_argument('--dim', type=positive_int, default=128, help='paths')
    p.add_argument('--chunk', type=positive_int, default=196, help='paths')
    p.add_argument('--update', choices=['parallel', 'sequential'], default='parallel')
    p.add_argument('--compile', action='store_true', help='paths: also under torch.compile')
    p.add_argument('--arch', default='m3', help='backbone')
    p.add_argument('--size', type=positive_int, default=224, help='backbone')
    p.add_argument('--working-set-mib', type=positive_int, default=64, help='backbone')
    p.add_argument('--before', metavar='PATH', help='backbone: also an older checkout')
    p.add_argument('--rounds', type=positive_int, default=3, help='backbone')
    p.add_argument('--budget-s', type=non_negative_float,
                   help='GPU sections: seconds the run may take (default 450; dry run none)')


def memory(args: argparse.Namespace) -> Dict:
    from benchmarks.common.record import Record
    from benchmarks.memory import paths as memory_cost, suite as memory_suite
    from convneur_mm.analysis.timing import setup_benchmark_device
    dry, out = args.dry_run, {}
    if 'paths' in args.sections:
        device = setup_benchmark_device('cpu' if dry else args.device)
        sizes = (dict(batch=args.batch or 2, tokens=64, dim=16, chunk=16, repeats=1,
                      gemm_size=256) if dry
                 else dict(batch=args.batch or 8, tokens=args.tokens, dim=args.dim,
                           chunk=args.chunk, repeats=args.repeats))
        out['paths'] = r = memory_cost.paths_benchmark('cpu' if dry else args.device,
                                                       update=args.update, compile=args.compile,
                                                       log=_log, **sizes)
        print(memory_cost.paths_report(r, device) + '\n')
    if 'backbone' in args.sections:
        device = setup_benchmark_device('cpu')
        sizes = (dict(batch=1, size=32, rounds=1, repeats=1) if dry else
                 dict(batch=args.batch or 8, size=args.size, rounds=args.rounds,
                      repeats=args.repeats))
        out['backbone'] = r = memory_cost.backbone_benchmark(
            args.arch, working_set_mib=args.working_set_mib, before=args.before, **sizes)
        print(memory_cost.backbone_report(r, device) + '\n')
    gpu = [s for s in args.sections if s in memory_suite.SECTIONS]
    if gpu:
        if not dry and not torch.cuda.is_available():
            raise SystemExit(f'the sections {gpu} need CUDA; on a CPU add --dry-run')
        code, out["suite"] = memory_suite.run(Record(None, "memory"), gpu, dry, args.batch, args.budget_s,
                                              sys.argv[1:])
        out['exit_code'] = code
    return out


def checkpointing_arguments(p: argparse.ArgumentParser) -> None:
    _device(p)
    _dry_run(p)
    p.add_argument('--arch', default='m3')
    p.add_argument('--batch', type=positive_int, default=2, help='images per measurement')
    p.add_argument('--size', type=positive_int, nargs=2, metavar=('H', 'W'),
                   help='default 512 512 (--per-gpu-batch: 224 224)')
    p.add_argument('--chunk-size', type=positive_int, default=1024)
    p.add_argument('--max-lr', type=float, default=0.2)
    p.add_argument('--drop-path-rate', type=float, default=0.1)
    p.add_argument('--repeats', type=positive_int, default=3)
    p.add_argument('--threads', type=positive_int, help='torch intra-op threads (CPU)')
    p.add_argument('--per-gpu-batch', action='store_true', help='instead: the per-GPU batch '
                   'of ImageNet training under --amp that fits a card, per arch')
    p.add_argument('--archs', nargs='+', default=['m1', 'm2', 'm3', 'm4'],
                   help='--per-gpu-batch')
    p.add_argument('--gpu-gib', type=positive_float, default=24.0, help='--per-gpu-batch')
    p.add_argument('--reserve-gib', type=non_negative_float, default=3.0,
                   help='--per-gpu-batch: CUDA context, workspaces, fragmentation')
    p.add_argument('--gpus', type=positive_int, default=8, help='--per-gpu-batch')


def checkpointing(args: argparse.Namespace) -> Dict:
    from convneur_mm.analysis import memory_fit as lib
    from convneur_mm.analysis.timing import setup_benchmark_device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        args.arch, args.archs, args.batch, args.size, args.repeats = 'm1', ['m1'], 1, [64, 64], 1
    if args.per_gpu_batch:
        size = args.size or [224, 224]
        if size[0] != size[1]:
            raise SystemExit(f'--per-gpu-batch measures square images, got --size {size}')
        estimates = {arch: lib.imagenet_estimate(arch, args.batch, size[0]) for arch in args.archs}
        rows, notes = lib.imagenet_batches(estimates, args.gpu_gib, args.reserve_gib, args.gpus)
        print(f'ImageNet training at {size[0]}x{size[0]}, --amp (activations measured under a '
              f'CPU stand-in for CUDA fp16 autocast), AdamW; GPU of {args.gpu_gib:g} GiB, '
              f'{args.reserve_gib:g} GiB reserved; {args.gpus} GPUs, effective batch '
              f'{lib.PAPER_BATCH}\n{lib.imagenet_table(rows)}' + ''.join('\n' + n for n in notes))
        too_small = [f'ConvNeur-{arch.upper()}' for arch, r in rows.items() if not r['batch']]
        if too_small:  # a config cannot train on this card: exit 1
            _log(f'error: not even a batch of 1 fits a GPU of {args.gpu_gib:g} GiB '
                 f'({args.reserve_gib:g} GiB reserved): {", ".join(too_small)}')
        return dict(rows=rows, warnings=notes, exit_code=1 if too_small else 0)
    device = setup_benchmark_device(args.device)
    size = args.size or [512, 512]
    rows = lib.checkpointing_rows(args.arch, args.device, args.batch, size, args.repeats,
                                  chunk_size=args.chunk_size, max_lr=args.max_lr,
                                  drop_path_rate=args.drop_path_rate)
    print(f'ConvNeur-{args.arch.upper()} backbone fwd+bwd, batch {args.batch} x {size[0]}x'
          f'{size[1]}, chunk {args.chunk_size}, max_lr {args.max_lr}, on {device}\n'
          + lib.checkpointing_report(rows, args.batch))
    return dict(device=device, rows=rows)


def train_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.training.throughput import add_arguments
    add_arguments(p)


def train(args: argparse.Namespace) -> Dict:
    from benchmarks.training.throughput import run_from_args
    return run_from_args(args)


def precision_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.training.precision import add_arguments
    add_arguments(p)


def precision(args: argparse.Namespace) -> Dict:
    from benchmarks.training.precision import run_from_args
    return run_from_args(args)


RUNNERS = {'speed': (speed_arguments, speed), 'compile': (compile_arguments, compile_),
           'onnx': (onnx_arguments, onnx), 'resolution': (resolution_arguments, resolution),
           'memory': (memory_arguments, memory),
           'checkpointing': (checkpointing_arguments, checkpointing),
           'train': (train_arguments, train),
           'precision': (precision_arguments, precision)}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def build_parser(task: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``task``'s options (without a task: the common ones)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--task', required=True, choices=TASKS)
    parser.add_argument('--json', type=writable_file, metavar='PATH',
                        help='also write the result as JSON here (checked at start)')
    if task is not None:
        RUNNERS[task][0](parser)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """``--task`` first, then the options of that task."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument('--task', choices=TASKS)
    known, _ = first.parse_known_args(argv)
    return build_parser(known.task).parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    silence_known_third_party_warnings()  # the stack's known noise, not ours to act on
    args = parse_args(argv)
    result = RUNNERS[args.task][1](args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(task=args.task, argv=list(sys.argv[1:] if argv is None else argv),
                           result=result), f, indent=1)
    if result.get('exit_code'):
        raise SystemExit(result['exit_code'])
    return result


if __name__ == '__main__':
    main()
