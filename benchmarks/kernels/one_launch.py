"""One memory kernel's call, once, for the tools that watch a whole process
(the ``launch`` case): Nsight Compute with ``--profile-from-start off`` and
compute-sanitizer.

The call is the tuner's (``tune.stage_calls``, ``tune.OP_OF``): the write or
the read at one stage's shapes, its forward for a forward kernel and a
training step for a backward kernel, on random inputs. It runs ``--warmup``
times outside the profiled range (Triton compiles there), then once between
``cudaProfilerStart`` and ``cudaProfilerStop``, the kernel forced at its own
tiles or at ``--rows`` rows (past ``tiles.row_limit`` too: how the 64-row
fault is reproduced). Its results are then compared with the PyTorch path's
on the same inputs; the exit status is 1 where they disagree or hold NaN.

    python -m benchmarks.run launch read_backward_rows --rows 64
    ncu --profile-from-start off -k regex:'^read_kernel' -c 1 \\
        python -m benchmarks.run launch read
    TRITON_INTERPRET=1 python -m benchmarks.run launch read --dry-run   # a CPU
"""
import argparse
import math
from typing import Dict

import torch

from benchmarks.common.record import Record, UsageError
from benchmarks.common.subjects import relative_error
from benchmarks.kernels.tune import (OP_OF, add_stage_arguments, apply_tuned, stage_calls,
                                     stage_of_args)
from convneur_mm.models.layers.memory_ops.kernels.tiles import forced_tiles
from convneur_mm.utils.cli import positive_int

# relative error against the PyTorch path on the same operands: float32
# products agree to rounding; 16-bit operands round differently in each
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def launch_once(kernel: str, shape, operand_dtype: torch.dtype, device, rows=None,
                warmup: int = 1) -> Dict:
    """Run ``kernel``'s call ``warmup`` times, then once inside the CUDA
    profiler's range; its error against the PyTorch path.

    Args:
        kernel: one of ``tune.OP_OF``.
        shape: a ``bytes.MemoryShape``.
        operand_dtype: the products' operand dtype.
        device: 'cuda' (or 'cpu' in Triton's interpreter).
        rows: the tile's rows (BM), or None for the kernel's own.
        warmup: untimed calls before the watched one.
    """
    calls = stage_calls(shape, operand_dtype, device)
    name = OP_OF[kernel]
    options = {} if rows is None else dict(BM=rows)
    cuda = torch.device(device).type == 'cuda'
    with forced_tiles(kernel, **options):
        for _ in range(warmup):
            calls.triton[name]()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        got = calls.triton[name]()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    want = calls.torch[name]()
    errors = [relative_error([g], [w]) for g, w in zip(got, want)]
    worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    return dict(kernel=kernel, call=name, shape=shape._asdict(), rows=rows,
                operand_dtype=str(operand_dtype).replace('torch.', ''), errors=errors,
                worst_error=worst, tolerance=TOLERANCE[operand_dtype],
                agrees=not math.isnan(worst) and worst <= TOLERANCE[operand_dtype])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``launch`` case's options."""
    parser.add_argument('kernel', choices=list(OP_OF), help='the kernel whose call runs')
    add_stage_arguments(parser)
    parser.add_argument('--rows', type=positive_int, help="the tile's rows (BM)")
    parser.add_argument('--warmup', type=int, default=1, help='calls before the watched one')
    parser.add_argument('--tuned', nargs='+', default=[], metavar='JSON',
                        help="tune records whose entries apply (tune.apply_tuned)")


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``launch_once`` with the parsed options; a dry run is a CPU run in
    Triton's interpreter at the tuner's tiny shape, float16."""
    if args.warmup < 0:
        raise UsageError('--warmup must be >= 0')
    shape, dtype, device = stage_of_args(args, 'launch', 'runs a kernel')
    applied = apply_tuned(args.tuned) if args.tuned else None
    result = launch_once(args.kernel, shape, dtype, device, args.rows, args.warmup)
    result['tuned'] = applied
    errors = ', '.join(f'{e:.2e}' for e in result['errors'])
    print(f"[launch] {args.kernel} ({result['call']}, rows {args.rows or 'own'}): "
          f"errors against PyTorch {errors}; {'agrees' if result['agrees'] else 'DISAGREES'} "
          f"(tolerance {result['tolerance']:.0e})")
    return dict(result, exit_code=0 if result['agrees'] else 1)
