"""Speed and training memory of ConvNeur on your machine, one task per call.

    python tools/analysis_tools/benchmark.py --task TASK [options] [--json PATH]
    python tools/analysis_tools/benchmark.py --task TASK --help   # the task's options

Tasks (the measuring code is in convneur_mm/analysis/):
  speed          throughput, latency, peak memory of ConvNeur and its peers
                 (speed.py), with the GEMM-rate bound of M3
  checkpointing  training memory: with_cp and the memory's recompute, or the
                 per-GPU ImageNet batch that fits a card (memory_fit.py)

Every task prints its report and, with --json, writes its result there.
--dry-run runs a task at tiny sizes on the CPU (a check, not a measurement).
The lab's measurements of fixed subjects (the memory's paths and kernels,
training throughput, precision, compile, ONNX, resolution, Table 5) run
from a checkout: python -m benchmarks.run (benchmarks/README.md).
"""
import argparse
import json
import sys
from typing import Dict, List, Optional

import torch

from convneur_mm.models.backbones.convneur import ConvNeur
from convneur_mm.utils.cli import non_negative_float, positive_float, positive_int, writable_file
from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings

TASKS = ('speed', 'checkpointing')


ARCHS = tuple(ConvNeur.arch_settings)


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument('--device', help="default: 'cuda' where there is one, else 'cpu' "
                   "(--dry-run: 'cpu')")


def _resolve_device(args: argparse.Namespace) -> None:
    """``--device``'s default: the CPU for a dry run (a check at tiny sizes),
    else CUDA where there is one."""
    if args.device is None:
        args.device = 'cpu' if args.dry_run or not torch.cuda.is_available() else 'cuda'


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


def checkpointing_arguments(p: argparse.ArgumentParser) -> None:
    _device(p)
    p.add_argument('--dry-run', action='store_true',
                   help='tiny sizes on the CPU: M1, batch 1, 64x64, one repeat')
    p.add_argument('--arch', default='m3', choices=ARCHS)
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
    p.add_argument('--archs', nargs='+', default=list(ARCHS), choices=ARCHS,
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


RUNNERS = {'speed': (speed_arguments, speed),
           'checkpointing': (checkpointing_arguments, checkpointing)}


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
    args = build_parser(known.task).parse_args(argv)
    _resolve_device(args)  # every task has --device and --dry-run
    return args


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
