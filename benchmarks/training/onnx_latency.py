"""Batch-1 latency of the exported models: ONNX Runtime vs PyTorch eager vs compiled.

Each model (M1-M4 ImageNet classifiers at 224x224, M2 Semantic FPN at
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
import os.path as osp
import time
from typing import Dict, List, Optional

import torch

from convneur_mm.analysis.timing import median, time_call, time_in_turns
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model
from convneur_mm.deployment import DeployableModel, export_onnx, onnx_outputs, ort_session
from convneur_mm.utils.tables import markdown_table

# ONNX Runtime's intra-op threads spin for tens of milliseconds after a run and
# slow the next call of any variant: each round starts after this rest.
SPIN_SETTLE_S = 0.5

MODELS = {'m1': ('cls_convneur_m1_300e_in1k.py', 224),
          'm2': ('cls_convneur_m2_300e_in1k.py', 224),
          'm3': ('cls_convneur_m3_300e_in1k.py', 224),
          'm4': ('cls_convneur_m4_300e_in1k.py', 224),
          'fpn-m2': ('fpn_convneur_m2_80k_ade20k.py', 512)}


def measure(name: str, repeats: int, out_dir: str, size: Optional[int] = None,
            backend: str = 'inductor') -> Dict:
    """Export ``MODELS[name]`` into ``out_dir`` and time its four variants.

    Args:
        name: a key of ``MODELS``.
        repeats: timed turns.
        out_dir: where the ``.onnx`` file is written.
        size: the input's side, instead of the model's own.
        backend: ``torch.compile``'s backend for the compiled variant.

    Returns:
        ``export_s``, ``compile_s``, ``diffs`` (largest absolute difference
        from eager), and each variant's median seconds.
    """
    config, own_size = MODELS[name]
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


def table(results: List[Dict]) -> str:
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
