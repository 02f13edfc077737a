"""Eager against ``torch.compile`` (what ``--compile`` compiles), in one run
(the ``compile`` case), and the exported models' batch-1 latency in ONNX
Runtime beside both (the ``onnx`` case).

Workloads:

* ``inference``: ImageNet classifiers (``speed.MODELS``; ConvNeur-M3 by
  default), eval, 224x224, batch 16 on a CPU (128 on CUDA): throughput;
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
is given. ``amp`` runs both under bf16 (CPU) / fp16 (CUDA) autocast.
``profile_rows`` (not None) also profiles one eager and one compiled call
(``op_profile.profile_call``): where the time goes, by category.

**ONNX.** Each model (M1-M4 ImageNet classifiers at 224x224, M2 Semantic FPN at
512x512, batch 1, random init) is exported as ``tools/deployment/
pytorch2onnx.py`` exports it (static shape, normalization inside), then the
same ``DeployableModel`` is timed in PyTorch eager, under ``torch.compile``
(static shapes; the compile time is the warm-up, reported) and in ONNX Runtime
on the CPU with as many intra-op threads as torch uses, twice: as ONNX
Runtime runs by default, its threads spinning for work after a run, and
with ``spinning=False`` (``convneur_mm.deployment.ort_session``). The
variants take turns after a warm-up, the spinning session last in each round
and each round after a rest (spinning threads slow the next PyTorch call);
medians, with the largest absolute difference of ONNX Runtime's and the
compiled model's outputs from eager on the timed input.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from benchmarks.common.record import Record, device_line
from benchmarks.common.subjects import convneur_backbone
from convneur_mm.analysis.memory_fit import outputs_loss
from convneur_mm.analysis.op_profile import profile_call
from convneur_mm.analysis.timing import median, time_call, time_in_turns
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model
from convneur_mm.deployment import DeployableModel, export_onnx, onnx_outputs, ort_session
from convneur_mm.engine.compile import (compilable_parts, compile_forward, graphs_compiled,
                                        part_modules)
from convneur_mm.utils.cli import positive_int, writable_dir
from convneur_mm.utils.tables import markdown_table

WORKLOADS = ('inference', 'train', 'detector')


class Workload(NamedTuple):
    """A model, one call of the work to time, its title and the images per call
    (None: report seconds per call instead of images/s)."""
    model: nn.Module
    step: Callable[[], None]
    title: str
    images: Optional[int]


class CompiledSwitch:
    """Switch a model's parts between their eager ``forward`` and the compiled
    one that ``--compile`` installs (same modules, same weights)."""

    def __init__(self, model: nn.Module, parts: List[str], backend: str = 'inductor'):
        self.modules = part_modules(model, parts)
        self.compiled = [compile_forward(m, backend=backend) for m in self.modules]

    def use(self, compiled: bool) -> None:
        for module, forward in zip(self.modules, self.compiled):
            if compiled:
                module.forward = forward
            else:
                vars(module).pop('forward', None)


def inference_workload(name: str, device: str, batch: int, size: int = 224) -> Workload:
    """``speed.MODELS[name]`` in eval mode on ``batch`` images of ``size``."""
    from convneur_mm.analysis.speed import build_classifier
    fn, model = build_classifier(name)
    model.to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)

    def step():
        with torch.no_grad():
            fn(x)
    return Workload(model, step, f'{name} classifier, eval, batch {batch} x {size}x{size}', batch)


def train_workload(device: str, arch: str = 'm3', batch: int = 2, size: int = 512) -> Workload:
    """The dense-prediction configs' backbone: forward + backward."""
    from convneur_mm.apis.toolbox import quiet_init
    backbone = convneur_backbone(arch, memory_cfg=dict(chunk_size=1024, max_lr=0.2),
                                 drop_path_rate=0.1, out_indices=(0, 1, 2, 3),
                                 gap_before_final_norm=False)
    with quiet_init():
        backbone.init_weights()
    holder = nn.Module()  # compiled like a model's .backbone part
    holder.backbone = backbone.to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)

    def step():
        holder.backbone.zero_grad(set_to_none=True)
        outputs_loss(holder.backbone(x)).backward()
    return Workload(holder, step, f'ConvNeur-{arch.upper()} backbone (chunk 1024), forward + '
                    f'backward, batch {batch} x {size}x{size}', None)


def detector_workload(device: str, size: Sequence[int] = (800, 1333)) -> Workload:
    """Cascade Mask R-CNN ConvNeur-M3: losses + backward of one image."""
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = build_model(load_config('cascade_rcnn_convneur_m3_1x_coco.py'), init=True)
    model = model.to(device).train()
    raw = demo_mm_inputs(1, (3, *size), num_items=[3], num_classes=80, with_mask=True,
                         device=device)
    data = model.data_preprocessor(raw, True)

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = model.parse_losses(model.loss(data['inputs'], data['data_samples']))
        loss.backward()
    return Workload(model, step, 'Cascade Mask R-CNN ConvNeur-M3, training step (losses + '
                    f'backward), batch 1 x {size[0]}x{size[1]}', None)


def compare(model: nn.Module, step: Callable[[], None], repeats: int, device: str,
            amp: bool = False, profile_rows: Optional[int] = None,
            backend: str = 'inductor') -> Dict:
    """Median seconds of ``step`` eager and compiled, taking turns.

    Args:
        model: the model ``step`` runs; its ``compilable_parts`` are compiled.
        step: one call of the work.
        repeats: timed turns.
        device: where it runs.
        amp: both under autocast (fp16 on CUDA, bf16 on a CPU).
        profile_rows: not None: also ``profile_call`` one call of each (and
            print that many of its events).
        backend: ``torch.compile``'s backend.

    Returns:
        ``eager``, ``compiled`` (median seconds), ``compile_s`` (the first
        compiled call), ``graphs`` (compiled in it), ``parts``; ``profile``.
    """
    parts = compilable_parts(model)
    switch = CompiledSwitch(model, parts, backend)
    dtype = torch.float16 if device.startswith('cuda') else torch.bfloat16
    context = ((lambda: torch.autocast(torch.device(device).type, dtype=dtype)) if amp
               else nullcontext)

    def call(compiled: bool) -> None:
        switch.use(compiled)
        with context():
            step()

    time_call(lambda: call(False), device)  # warm-up
    graphs = graphs_compiled()
    compile_seconds = time_call(lambda: call(True), device)
    graphs = graphs_compiled() - graphs
    times = time_in_turns({False: lambda: call(False), True: lambda: call(True)}, repeats,
                          device)
    result = dict(eager=median(times[False]), compiled=median(times[True]),
                  compile_s=compile_seconds, graphs=graphs, parts=parts)
    if profile_rows is not None:
        result['profile'] = {mode: profile_call(lambda: call(mode == 'compiled'), device,
                                                profile_rows)
                             for mode in ('eager', 'compiled')}
    switch.use(False)
    return result


def run_workloads(workloads: Dict[str, Callable[[], Workload]], repeats: int, device: str,
                  amp: bool = False, profile_rows: Optional[int] = None,
                  backend: str = 'inductor', log: Callable[[str], None] = print) -> Dict:
    """``compare`` of each workload (built by its function), each with an
    empty Dynamo cache; ``log`` gets each profile table as soon as it exists."""
    results = {}
    for name, build in workloads.items():
        # a fresh Dynamo cache: the workloads share code (ConvNeur.forward), and
        # another workload's shapes would make this one compile dynamic shapes
        torch._dynamo.reset()
        work = build()
        r = compare(work.model, work.step, repeats, device, amp, profile_rows, backend)
        results[name] = dict(r, title=work.title, images=work.images)
        log(f'measured {name}')
        if profile_rows is not None:  # right away: a later workload may take long or fail
            log(f'\n{breakdown_table(name, **r["profile"])}\n')
        del work
    return results


def comparison_table(results: Dict) -> str:
    """Markdown: each workload's eager and compiled speed, speed-up, compile time."""
    rows = []
    for r in results.values():
        if r['images']:
            cells = (f'{r["images"] / r["eager"]:.1f} img/s',
                     f'{r["images"] / r["compiled"]:.1f} img/s')
        else:
            cells = (f'{r["eager"]:.2f} s', f'{r["compiled"]:.2f} s')
        rows.append((r['title'], ', '.join(r['parts']), *cells,
                     f'{r["eager"] / r["compiled"]:.2f}x', f'{r["compile_s"]:.0f} s',
                     r['graphs']))
    return markdown_table(('workload', 'compiled parts', 'eager', 'compiled', 'speed-up',
                           'compile time', 'graphs'), rows)


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


# ------------------------------------------------------------------ ONNX
# ONNX Runtime's intra-op threads spin for tens of milliseconds after a run and
# slow the next call of any variant: each round starts after this rest.
SPIN_SETTLE_S = 0.5

ONNX_MODELS = {'m1': ('cls_convneur_m1_300e_in1k.py', 224),
          'm2': ('cls_convneur_m2_300e_in1k.py', 224),
          'm3': ('cls_convneur_m3_300e_in1k.py', 224),
          'm4': ('cls_convneur_m4_300e_in1k.py', 224),
          'fpn-m2': ('fpn_convneur_m2_80k_ade20k.py', 512)}


def measure_onnx(name: str, repeats: int, out_dir: str, size: Optional[int] = None,
            backend: str = 'inductor') -> Dict:
    """Export ``ONNX_MODELS[name]`` into ``out_dir`` and time its four variants.

    Args:
        name: a key of ``ONNX_MODELS``.
        repeats: timed turns.
        out_dir: where the ``.onnx`` file is written.
        size: the input's side, instead of the model's own.
        backend: ``torch.compile``'s backend for the compiled variant.

    Returns:
        ``export_s``, ``compile_s``, ``diffs`` (largest absolute difference
        from eager), and each variant's median seconds.
    """
    config, own_size = ONNX_MODELS[name]
    size = size or own_size
    cfg = load_config(config)
    torch.manual_seed(0)
    module = DeployableModel(build_model(cfg).eval(), 'model', cfg.default_scope).eval()
    images = torch.rand(1, 3, size, size) * 255
    path = osp.join(out_dir, f'{name}.onnx')
    export_s = time_call(lambda: export_onnx(module, images, path,
                                             output_names=module.output_names()))
    threads = torch.get_num_threads()
    session = ort_session(path, threads=threads)  # ONNX Runtime's default: spinning
    quiet_session = ort_session(path, threads=threads, spinning=False)
    compiled = torch.compile(module, dynamic=False, backend=backend)
    # in this order each round, then SPIN_SETTLE_S of rest: the spinning
    # session runs last, so that its idle threads slow no other variant
    runs = {'eager': lambda: module(images), 'compiled': lambda: compiled(images),
            'onnxruntime, no spinning': lambda: onnx_outputs(quiet_session, images),
            'onnxruntime': lambda: onnx_outputs(session, images)}
    with torch.no_grad():
        want = module(images)
        compile_s = time_call(runs['compiled'])
        runs['onnxruntime']()
        diffs = {'onnxruntime': (onnx_outputs(quiet_session, images)[0] - want).abs().max().item(),
                 'compiled': (compiled(images) - want).abs().max().item()}
        times = time_in_turns(runs, repeats, before_round=lambda: time.sleep(SPIN_SETTLE_S))
    return dict(name=name, size=size, export_s=export_s, compile_s=compile_s,
                diffs=diffs, **{k: median(v) for k, v in times.items()})


def onnx_table(results: List[Dict]) -> str:
    """Markdown: each model's medians in ms, eager / ORT, differences, set-up times."""
    rows = [(r['name'], f'{r["size"]}x{r["size"]}', f'{1e3 * r["eager"]:.1f}',
             f'{1e3 * r["compiled"]:.1f}', f'{1e3 * r["onnxruntime"]:.1f}',
             f'{1e3 * r["onnxruntime, no spinning"]:.1f}',
             f'{r["eager"] / r["onnxruntime"]:.2f}x',
             f'{r["diffs"]["onnxruntime"]:.2g}, {r["diffs"]["compiled"]:.2g}',
             f'{r["export_s"]:.0f}, {r["compile_s"]:.0f}') for r in results]
    return markdown_table(('model', 'input', 'eager (ms)', 'compiled (ms)', 'ONNX Runtime (ms)',
                           'ORT, no spinning (ms)', 'eager / ORT', 'max abs diff ORT, compiled',
                           'export, compile (s)'), rows)


# ---------------------------------------------------------------- the cases
def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compile`` case's options."""
    from convneur_mm.analysis.speed import MODELS
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--workloads', nargs='+', default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument('--models', nargs='+', default=['ConvNeur-M3'], choices=list(MODELS),
                        help='the inference workload\'s classifiers')
    parser.add_argument('--repeats', type=positive_int, default=3)
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--batch', type=positive_int, help='inference batch (CPU 16, CUDA 128)')
    parser.add_argument('--profile', action='store_true',
                        help='profile one eager and one compiled call: where the time goes')
    parser.add_argument('--profile-rows', type=int, default=0,
                        help='with --profile, also print the N events with most self time')


def run_compile(args: argparse.Namespace, record: Record) -> Dict:
    """The asked workloads eager against compiled (a dry run: tiny images,
    M1, Dynamo tracing only with the 'eager' backend)."""
    from convneur_mm.analysis.speed import throughput_batch
    device = device_line(args.device)
    dry = args.dry_run
    batch = 1 if dry else throughput_batch(args.device, args.batch)
    builders: Dict[str, Callable] = {}
    for name in args.workloads:
        if name == 'inference':
            for model in args.models:
                builders[f'inference {model}'] = (lambda model=model: inference_workload(
                    model, args.device, batch, 64 if dry else 224))
        elif name == 'train':
            builders['train'] = lambda: train_workload(
                args.device, *(('m1', 1, 64) if dry else ()))
        else:
            builders['detector'] = lambda: detector_workload(
                args.device, (128, 128) if dry else (800, 1333))
    print(f'eager vs torch.compile on {device}' + (', under autocast' if args.amp else '')
          + f'; median of {args.repeats} interleaved runs')
    results = run_workloads(builders, args.repeats, args.device, args.amp,
                            args.profile_rows if args.profile else None,
                            'eager' if dry else 'inductor', log=_log)
    print(comparison_table(results))
    return dict(device=device, amp=args.amp, results=results)


def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``onnx`` case's options (on the CPU: ONNX Runtime's provider)."""
    parser.add_argument('--models', nargs='+', default=list(ONNX_MODELS),
                        choices=list(ONNX_MODELS))
    parser.add_argument('--repeats', type=positive_int, default=5)
    parser.add_argument('--out-dir', type=writable_dir,
                        help='keep the .onnx files here (default: a temporary folder)')


def run_onnx(args: argparse.Namespace, record: Record) -> Dict:
    """``measure_onnx`` of each model (a dry run: M1 at 64x64, one repeat,
    the 'eager' backend)."""
    device = device_line('cpu')
    models, size = (['m1'], 64) if args.dry_run else (args.models, None)
    repeats = 1 if args.dry_run else args.repeats
    print(f'batch-1 latency on {device}; median of {repeats} interleaved runs')
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            results.append(measure_onnx(name, repeats, args.out_dir or tmp, size,
                                        'eager' if args.dry_run else 'inductor'))
            _log(f'measured {name}')
    print(onnx_table(results))
    return dict(device=device, results=results)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
