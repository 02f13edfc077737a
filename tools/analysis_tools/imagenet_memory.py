"""Per-GPU memory of ImageNet training (ConvNeur-M1..M4 at 224x224 with
``--amp``) and the per-GPU batch that fits a GPU of ``--gpu-gib``, which is
what the ``cls_convneur_m*_300e_in1k.py`` configs set.

    python tools/analysis_tools/imagenet_memory.py [--archs m1 m2 m3 m4]
        [--batch 2] [--gpu-gib 24] [--reserve-gib 3] [--gpus 8]

Measured on any device (no GPU needed) with the backbone built from each
config, in training mode, under a CPU stand-in for CUDA's fp16 autocast
(``fp16_headroom``'s: float16 autocast on the CPU with LayerNorm in float32,
as CUDA's autocast runs it): the tensors autograd saves are then what a CUDA
``--amp`` step saves, 2-byte where CUDA casts to float16, 4-byte where it
keeps float32 (the LayerNorms' inputs, GRN's squares, the neural memory's
inner loop). CPU bf16 autocast, which runs LayerNorm in bfloat16, would
save about 10% less and underestimate the GPU's need. Per GPU:

* activations per image: the saved-tensor bytes of one forward + backward
  (``convneur_mm.analysis.profiling.measure_memory``), plus the
  largest block's own activations, held a second time while its backward
  runs (the transient peak); the head's (a pooled vector) are negligible;
* weights, gradients and AdamW's two moments, all float32: 16 bytes per
  parameter (the fp16 weight copies autocast caches are in the activations);
* ``--reserve-gib`` for the CUDA context, cuDNN / cuBLAS workspaces and the
  caching allocator's fragmentation (our assumption, not measured).

The per-GPU batch is the largest power of two that fits, and
``accumulative_counts = 4096 / (GPUS x batch)`` keeps the paper's batch of 4096
(8 GPUs x 512) and its learning rate. A GPU count that does not divide 4096
into such a product gets a warning naming the global batch it gives instead;
a model whose batch of 1 does not fit is reported and the tool exits 1.
"""
import argparse
import sys

import torch

from convneur_mm.analysis.fp16_headroom import cuda_fp16_stand_in
from convneur_mm.analysis.profiling import measure_memory
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model, quiet_init
from convneur_mm.utils.cli import non_negative_float, positive_float, positive_int
from convneur_mm.utils.tables import markdown_table

GIB = 2**30
MIB = 2**20
PAPER_BATCH = 4096


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='+', default=['m1', 'm2', 'm3', 'm4'])
    parser.add_argument('--batch', type=positive_int, default=2, help='images per measurement')
    parser.add_argument('--size', type=positive_int, default=224)
    parser.add_argument('--gpu-gib', type=positive_float, default=24.0)
    parser.add_argument('--reserve-gib', type=non_negative_float, default=3.0)
    parser.add_argument('--gpus', type=positive_int, default=8)
    return parser.parse_args(argv)


def estimate(arch: str, batch: int = 2, size: int = 224) -> dict:
    """Bytes per image (activations + transient) and fixed bytes (16 per parameter)."""
    cfg = load_config(f'cls_convneur_{arch}_300e_in1k.py')
    with quiet_init():
        model = build_model(cfg, init=False)
    backbone = model.backbone.train()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    with cuda_fp16_stand_in():
        measured = measure_memory(backbone, x)
    params = sum(p.numel() for p in model.parameters())
    return dict(per_image=(measured['saved'] + measured['largest_block']) / batch,
                saved_per_image=measured['saved'] / batch, fixed=16 * params, params=params)


def fitting_batch(per_image: float, fixed: float, gpu_bytes: float, reserve: float) -> int:
    """The largest power of two whose step fits; 0 when not even a batch of 1 does."""
    if fixed + reserve + per_image > gpu_bytes:
        return 0
    batch = 1
    while fixed + reserve + 2 * batch * per_image <= gpu_bytes:
        batch *= 2
    return batch


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gpu, reserve = args.gpu_gib * GIB, args.reserve_gib * GIB
    print(f'ImageNet training at {args.size}x{args.size}, --amp (activations measured under '
          f'a CPU stand-in for CUDA fp16 autocast), AdamW; GPU of {args.gpu_gib:g} GiB, '
          f'{args.reserve_gib:g} GiB '
          f'reserved; {args.gpus} GPUs, effective batch {PAPER_BATCH}')
    rows, notes, table = {}, [], []
    for arch in args.archs:
        e = estimate(arch, args.batch, args.size)
        batch = fitting_batch(e['per_image'], e['fixed'], gpu, reserve)
        name = f'ConvNeur-{arch.upper()}'
        peak = (e['fixed'] + reserve + max(batch, 1) * e['per_image']) / GIB
        cells = [name, f'{e["params"] / 1e6:.2f}', f'{e["saved_per_image"] / MIB:.1f}',
                 f'{e["per_image"] / MIB:.1f}', f'{e["fixed"] / MIB:.0f}']
        if not batch:  # the peak of a batch of 1 is over the GPU
            rows[arch] = dict(e, batch=0, accumulative_counts=None, global_batch=None,
                              peak_gib=peak)
            table.append(cells + [f'none fits (batch 1: {peak:.1f} GiB)', f'{peak:.1f}', '-'])
            continue
        accumulate = max(1, PAPER_BATCH // (args.gpus * batch))
        global_batch = args.gpus * batch * accumulate
        rows[arch] = dict(e, batch=batch, accumulative_counts=accumulate,
                          global_batch=global_batch, peak_gib=peak)
        table.append(cells + [batch, f'{peak:.1f}', accumulate])
        if global_batch != PAPER_BATCH:
            notes.append(f'warning: {name}: {args.gpus} GPUs x batch {batch} x '
                         f'accumulative_counts {accumulate} = global batch {global_batch}, '
                         f'not {PAPER_BATCH} (the batch the configs\' learning rate is '
                         f'for): scale the learning rate by {global_batch}/{PAPER_BATCH} '
                         'or use a GPU count whose product with the batch divides it')
    print(markdown_table(('model', 'params (M)', 'saved activations / image (MiB)',
                          'with transient (MiB)', 'weights + grads + AdamW (MiB)',
                          'per-GPU batch', 'estimated peak (GiB)', 'accumulative_counts'),
                         table))
    for note in notes:
        print(note)
    too_small = [f'ConvNeur-{arch.upper()}' for arch, row in rows.items() if not row['batch']]
    if too_small:
        print(f'error: not even a batch of 1 fits a GPU of {args.gpu_gib:g} GiB '
              f'({args.reserve_gib:g} GiB reserved): {", ".join(too_small)}', file=sys.stderr)
        raise SystemExit(1)
    return rows


if __name__ == '__main__':
    main()
