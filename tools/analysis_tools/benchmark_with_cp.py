"""Training memory and time of the ConvNeur backbone with and without gradient
checkpointing (``with_cp=True``: each block's activations are recomputed in
the backward pass instead of kept), and with the memory's own recomputation
(``memory_cfg.recompute=True``: each neural memory saves only its input and
recomputes its inner forward in the backward pass).

    python tools/analysis_tools/benchmark_with_cp.py [--arch m3] [--batch 2]
        [--size 512 512] [--chunk-size 1024] [--repeats 3] [--device cpu]
    python tools/analysis_tools/benchmark_with_cp.py --size 224 224 --chunk-size 196 \
        --max-lr 1.0 --drop-path-rate 0   # ImageNet's M3

Default: ConvNeur-M3 as in the S-FPN / UperNet configs (chunk 1024, max_lr 0.2,
drop-path 0.1, all four stages out), batch 2 of 512x512 crops, forward + a
backward of a loss on every output. Printed as a Markdown table:

* activation memory: the bytes autograd saves for the backward pass, counted
  with ``convneur_mm.analysis.profiling.SavedTensorMeter`` (unique storages,
  parameters excluded), which works on the CPU too;
* with checkpointing, the backward pass also holds one recomputed block at a
  time: "peak estimate" adds the largest block's activations (measured in the
  run without checkpointing) to the saved bytes;
* on CUDA, also ``torch.cuda.max_memory_allocated`` over the step, less the
  memory allocated before it (parameters, input);
* time: median of ``--repeats`` forward+backward steps after a warm-up.
"""
import argparse

import torch

from convneur_mm.analysis.bench_env import (median, setup_benchmark_device, synchronize,
                                            time_calls)
from convneur_mm.analysis.profiling import measure_memory, outputs_loss
from convneur_mm.apis.toolbox import quiet_init
from convneur_mm.models import ConvNeur
from convneur_mm.utils.cli import positive_int

MIB = 2**20
# plain, block checkpointing, the memory's own recomputation
VARIANTS = (dict(with_cp=False), dict(with_cp=True), dict(with_cp=False, recompute=True))


def variant_name(with_cp: bool, recompute: bool = False):
    """The variant's key in the returned rows: ``with_cp`` itself, or
    'memory recompute'."""
    return 'memory recompute' if recompute else with_cp


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='m3')
    parser.add_argument('--batch', type=positive_int, default=2)
    parser.add_argument('--size', type=positive_int, nargs=2, default=[512, 512],
                        metavar=('H', 'W'))
    parser.add_argument('--chunk-size', type=positive_int, default=1024)
    parser.add_argument('--max-lr', type=float, default=0.2)
    parser.add_argument('--drop-path-rate', type=float, default=0.1)
    parser.add_argument('--repeats', type=positive_int, default=3)
    parser.add_argument('--threads', type=positive_int, help='torch intra-op threads (CPU)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return parser.parse_args(argv)


def build(args, with_cp: bool, recompute: bool = False) -> ConvNeur:
    torch.manual_seed(0)
    model = ConvNeur(arch=args.arch, memory_cfg=dict(chunk_size=args.chunk_size,
                                                     max_lr=args.max_lr, recompute=recompute),
                     drop_path_rate=args.drop_path_rate, out_indices=(0, 1, 2, 3),
                     gap_before_final_norm=False, with_cp=with_cp)
    with quiet_init():
        model.init_weights()
    return model.to(args.device).train()


def measure_time(model: ConvNeur, x: torch.Tensor, repeats: int) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        outputs_loss(model(x)).backward()
        synchronize(x.device)
    return median(time_calls(step, repeats, x.device, warmup=1))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_benchmark_device(args.device)
    x = torch.randn(args.batch, 3, *args.size, device=args.device)
    rows = {}
    for variant in VARIANTS:
        model = build(args, **variant)
        rows[variant_name(**variant)] = dict(measure_memory(model, x),
                                             time=measure_time(model, x, args.repeats))
        del model
    plain, cp = rows[variant_name(False)], rows[variant_name(True)]
    recompute = rows[variant_name(False, True)]
    print(f'ConvNeur-{args.arch.upper()} backbone fwd+bwd, batch {args.batch} x '
          f'{args.size[0]}x{args.size[1]}, chunk {args.chunk_size}, max_lr {args.max_lr}, '
          f'on {device}')
    cuda = 'cuda_peak' in plain
    print('| with_cp | activation memory saved for backward (MiB) | per image (MiB) | '
          'peak estimate (MiB) |' + (' CUDA peak (MiB) |' if cuda else '') + ' time (s) |')
    print('|---|---|---|---|' + ('---|' if cuda else '') + '---|')
    for name, row in rows.items():
        peak = row['saved'] + (plain['largest_block'] if row is cp else 0)
        label = 'False + memory recompute' if name == 'memory recompute' else name
        print(f'| {label} | {row["saved"] / MIB:.0f} | {row["saved"] / MIB / args.batch:.1f} | '
              f'{peak / MIB:.0f} |' + (f' {row["cuda_peak"] / MIB:.0f} |' if cuda else '')
              + f' {row["time"]:.2f} |')
    saving = 1 - (cp['saved'] + plain['largest_block']) / plain['saved']
    print(f'\nwith_cp keeps {cp["saved"] / plain["saved"]:.1%} of the saved activations '
          f'(peak estimate: {saving:.0%} less memory) at {cp["time"] / plain["time"]:.2f}x '
          'the step time')
    print(f'memory recompute keeps {recompute["saved"] / plain["saved"]:.1%} of the saved '
          f'activations at {recompute["time"] / plain["time"]:.2f}x the step time')
    return rows


if __name__ == '__main__':
    main()
