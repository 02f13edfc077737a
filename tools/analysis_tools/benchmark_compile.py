"""Eager vs ``torch.compile`` (what ``--compile`` compiles), in one run.

    python tools/analysis_tools/benchmark_compile.py [--workloads inference train detector]
        [--repeats 3] [--device cpu|cuda] [--amp] [--profile [--profile-rows N]]

Workloads:

* ``inference``: the ConvNeur-M3 ImageNet classifier, eval, 224x224, batch 16
  on a CPU (128 on CUDA): throughput;
* ``train``: the ConvNeur-M3 backbone as the S-FPN / UperNet configs set it
  (chunk 1024, max_lr 0.2, drop path 0.1, four outputs), batch 2 of 512x512,
  forward + backward of a loss on every output;
* ``detector``: Cascade Mask R-CNN with ConvNeur-M3 (our COCO config),
  batch 1 at 800x1333 with 3 boxes and masks, forward with losses +
  backward: the backbone and FPN compiled, the RoI heads eager.

Each workload builds one model. The compiled variant is ``torch.compile`` of
the same submodules ``convneur_mm.engine.compile`` compiles for ``--compile``
(sharing their weights); eager and compiled calls take turns after a warm-up
(the compiled warm-up is the compilation, reported), and the medians' ratio
is printed. ``--amp`` runs both under bf16 (CPU) / fp16 (CUDA) autocast.

``--profile`` then profiles one eager and one compiled call of each workload
(``torch.profiler``; on CUDA with the device's kernels, in device time) and
prints where the time goes, by the self time of the profiler's events
(``convneur_mm.analysis.op_profile``): convolutions, matrix products, the compiled regions'
own code (Inductor's fused kernels), mmcv ops (RoIAlign, NMS), other ATen
ops, the rest, and the wall time no event covers (Python between the ops).
``--profile-rows N`` also prints the N events with the most self time.
"""
import argparse
import sys
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from convneur_mm.analysis.bench_env import (median, setup_benchmark_device, time_call,
                                             time_in_turns)
from convneur_mm.analysis.op_profile import profile_call
from convneur_mm.engine.compile import (compilable_parts, compile_forward, graphs_compiled,
                                        part_modules)
from convneur_mm.utils.tables import markdown_table

WORKLOADS = ('inference', 'train', 'detector')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workloads', nargs='+', default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--batch', type=int, help='inference batch (CPU 16, CUDA 128)')
    parser.add_argument('--profile', action='store_true',
                        help='profile one eager and one compiled call: where the time goes')
    parser.add_argument('--profile-rows', type=int, default=0,
                        help='with --profile, also print the N events with most self time')
    return parser.parse_args(argv)


class CompiledSwitch:
    """Switch a model's parts between their eager ``forward`` and the compiled
    one that ``--compile`` installs (same modules, same weights)."""

    def __init__(self, model: nn.Module, parts: List[str]):
        self.modules = part_modules(model, parts)
        self.compiled = [compile_forward(m) for m in self.modules]  # as --compile

    def use(self, compiled: bool) -> None:
        for module, forward in zip(self.modules, self.compiled):
            if compiled:
                module.forward = forward
            else:
                vars(module).pop('forward', None)


def _inference(args):
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    model = build_model(load_config('cls_convneur_m3_300e_in1k.py'), init=False)
    model = model.to(args.device).eval()
    batch = args.batch or (128 if args.device.startswith('cuda') else 16)
    x = torch.randn(batch, 3, 224, 224, device=args.device)

    def step():
        with torch.no_grad():
            model(x, mode='tensor')
    return model, step, f'ConvNeur-M3 classifier, eval, batch {batch} x 224x224', batch


def _train(args):
    from convneur_mm.models import ConvNeur
    from convneur_mm.apis.toolbox import quiet_init
    torch.manual_seed(0)
    backbone = ConvNeur('m3', memory_cfg=dict(chunk_size=1024, max_lr=0.2),
                        drop_path_rate=0.1, out_indices=(0, 1, 2, 3),
                        gap_before_final_norm=False)
    with quiet_init():
        backbone.init_weights()
    holder = nn.Module()  # compiled like a model's .backbone part
    holder.backbone = backbone.to(args.device).train()
    x = torch.randn(2, 3, 512, 512, device=args.device)

    def step():
        holder.backbone.zero_grad(set_to_none=True)
        sum(o.float().square().mean() for o in holder.backbone(x)).backward()
    return holder, step, 'ConvNeur-M3 backbone (chunk 1024), forward + backward, batch 2 x 512x512', None


def _detector(args):
    from mmdet.testing import demo_mm_inputs
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    torch.manual_seed(0)
    cfg = load_config('cascade_rcnn_convneur_m3_1x_coco.py')
    model = build_model(cfg, init=True).to(args.device).train()
    raw = demo_mm_inputs(1, (3, 800, 1333), num_items=[3], num_classes=80, with_mask=True,
                         device=args.device)
    data = model.data_preprocessor(raw, True)

    def step():
        model.zero_grad(set_to_none=True)
        losses = model.loss(data['inputs'], data['data_samples'])
        loss, _ = model.parse_losses(losses)
        loss.backward()
    return model, step, ('Cascade Mask R-CNN ConvNeur-M3, training step (losses + backward), '
                         'batch 1 x 800x1333'), None


BUILDERS = {'inference': _inference, 'train': _train, 'detector': _detector}


def breakdown_table(name: str, eager: Dict[str, float], compiled: Dict[str, float]) -> str:
    """Markdown: seconds and shares per category, eager vs compiled."""
    total = {'eager': sum(eager.values()), 'compiled': sum(compiled.values())}
    rows = []
    for category in eager:
        e, c = eager[category], compiled[category]
        rows.append((category, f'{e:.3f} s ({e / total["eager"]:.0%})',
                     f'{c:.3f} s ({c / total["compiled"]:.0%})', f'{c - e:+.3f} s'))
    rows.append(('total (profiled call)', f'{total["eager"]:.3f} s',
                 f'{total["compiled"]:.3f} s', f'{total["compiled"] - total["eager"]:+.3f} s'))
    return markdown_table((f'{name}: where the time goes', 'eager', 'compiled',
                           'compiled - eager'), rows)


def compare(model: nn.Module, step: Callable, repeats: int, device: str, amp: bool,
            profile_rows: Optional[int] = None) -> Dict:
    """Median seconds of ``step`` eager and compiled, taking turns; with
    ``profile_rows`` (not None) also the ``profile_call`` of each."""
    parts = compilable_parts(model)
    switch = CompiledSwitch(model, parts)
    dtype = torch.float16 if device.startswith('cuda') else torch.bfloat16
    context = (lambda: torch.autocast(torch.device(device).type, dtype=dtype)) if amp else nullcontext

    def call(compiled: bool) -> None:
        switch.use(compiled)
        with context():
            step()

    def timed(compiled: bool) -> float:
        return time_call(lambda: call(compiled), device)

    timed(False)  # warm-up
    graphs = graphs_compiled()
    compile_seconds = timed(True)
    graphs = graphs_compiled() - graphs
    times = time_in_turns({False: lambda: call(False), True: lambda: call(True)}, repeats,
                          device)
    result = dict(eager=median(times[False]), compiled=median(times[True]),
                  compile_s=compile_seconds, graphs=graphs, parts=parts)
    if profile_rows is not None:
        result['profile'] = {mode: profile_call(lambda: call(mode == 'compiled'), device,
                                                profile_rows)
                             for mode in ('eager', 'compiled')}
    return result


def main(argv=None):
    args = parse_args(argv)
    device = setup_benchmark_device(args.device)
    print(f'eager vs torch.compile on {device}' + (', under autocast' if args.amp else '')
          + f'; median of {args.repeats} interleaved runs')
    rows, results = [], {}
    for name in args.workloads:
        # a fresh Dynamo cache: the workloads share code (ConvNeur.forward), and
        # another workload's shapes would make this one compile dynamic shapes
        torch._dynamo.reset()
        model, step, title, batch = BUILDERS[name](args)
        r = compare(model, step, args.repeats, args.device, args.amp,
                    args.profile_rows if args.profile else None)
        results[name] = r
        if batch:
            cells = (f'{batch / r["eager"]:.1f} img/s', f'{batch / r["compiled"]:.1f} img/s')
        else:
            cells = (f'{r["eager"]:.2f} s', f'{r["compiled"]:.2f} s')
        rows.append((title, ', '.join(r['parts']), *cells, f'{r["eager"] / r["compiled"]:.2f}x',
                     f'{r["compile_s"]:.0f} s', r['graphs']))
        print(f'measured {name}', file=sys.stderr, flush=True)
        if args.profile:  # right away: a later workload may take long or fail
            print(f'\n{breakdown_table(name, **r["profile"])}\n', flush=True)
        del model, step
    print(markdown_table(('workload', 'compiled parts', 'eager', 'compiled', 'speed-up',
                          'compile time', 'graphs'), rows))
    return results


if __name__ == '__main__':
    main()
