"""Latency of the exported models: ONNX Runtime vs PyTorch eager vs compiled.

    python tools/analysis_tools/benchmark_onnx.py [--models m1 m2 m3 m4 fpn-m2]
        [--repeats 5] [--out-dir DIR]

Each model (M1-M4 ImageNet classifiers at 224x224, M2 Semantic FPN at
512x512, batch 1, random init) is exported as ``tools/deployment/
pytorch2onnx.py`` exports it (static shape, normalization inside), then the
same ``DeployableModel`` is timed in PyTorch eager, under ``torch.compile``
(static shapes; the compile time is the warm-up, reported) and in ONNX Runtime
on the CPU with as many intra-op threads as torch uses, twice: as ONNX
Runtime runs by default, its threads spinning for work after a run, and
with ``spinning=False`` (``convneur_mm.deployment.ort_session``). The
variants take turns after a warm-up, the spinning session last in each round
and each round after a rest, since spinning threads made the next PyTorch
call 1.7x slower; medians are printed with the largest absolute difference of
ONNX Runtime's and the compiled model's outputs from eager on the timed input.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile
import time
from typing import Dict

import torch

from convneur_mm.analysis.bench_env import (median, setup_benchmark_device, time_call,
                                             time_in_turns)
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model
from convneur_mm.deployment import DeployableModel, export_onnx, onnx_outputs, ort_session
from convneur_mm.utils.cli import positive_int, writable_dir
from convneur_mm.utils.tables import markdown_table

# ONNX Runtime's intra-op threads spin for tens of milliseconds after a run and
# slow the next call of any variant: each round starts after this rest.
SPIN_SETTLE_S = 0.5

MODELS = {'m1': ('cls_convneur_m1_300e_in1k.py', 224),
          'm2': ('cls_convneur_m2_300e_in1k.py', 224),
          'm3': ('cls_convneur_m3_300e_in1k.py', 224),
          'm4': ('cls_convneur_m4_300e_in1k.py', 224),
          'fpn-m2': ('fpn_convneur_m2_80k_ade20k.py', 512)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--repeats', type=positive_int, default=5)
    parser.add_argument('--out-dir', type=writable_dir,
                        help='keep the .onnx files here (default: a temp dir)')
    return parser.parse_args(argv)


def measure(name: str, repeats: int, out_dir: str) -> Dict:
    config, size = MODELS[name]
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
    compiled = torch.compile(module, dynamic=False)
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


def main(argv=None) -> None:
    args = parse_args(argv)
    device = setup_benchmark_device('cpu')
    print(f'batch-1 latency on {device}; median of {args.repeats} interleaved runs')
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = measure(name, args.repeats, args.out_dir or tmp)
            rows.append((name, f'{r["size"]}x{r["size"]}', f'{1e3 * r["eager"]:.1f}',
                         f'{1e3 * r["compiled"]:.1f}', f'{1e3 * r["onnxruntime"]:.1f}',
                         f'{1e3 * r["onnxruntime, no spinning"]:.1f}',
                         f'{r["eager"] / r["onnxruntime"]:.2f}x',
                         f'{r["diffs"]["onnxruntime"]:.2g}, {r["diffs"]["compiled"]:.2g}',
                         f'{r["export_s"]:.0f}, {r["compile_s"]:.0f}'))
            print(f'measured {name}', file=sys.stderr, flush=True)
    print(markdown_table(('model', 'input', 'eager (ms)', 'compiled (ms)', 'ONNX Runtime (ms)',
                          'ORT, no spinning (ms)', 'eager / ORT', 'max abs diff ORT, compiled',
                          'export, compile (s)'), rows))

if __name__ == '__main__':
    main()
