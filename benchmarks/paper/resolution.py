"""Backbone forward time and peak memory against input resolution.

Models: ConvNeur-M3 with the dense-prediction memory setting (chunk 4096),
the same backbone with every other global-branch type of Table 5 in place of
the memory (self-attention, CBAM, Non-local, IR-RWKV, Titans), local-only,
and Swin-T. Each (model, size) runs in its own process (peak memory is its
own). A run whose time or peak memory, extrapolated from the smaller sizes,
would exceed a limit is skipped and reported with the prediction. The report
gives the fitted exponent of time and of peak memory against pixel count and
t(2048^2) / t(1024^2), and a figure.
"""
import argparse
import math
import os
import os.path as osp
import sys
import textwrap
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.common.record import Record
from convneur_mm.analysis.isolated import run_isolated
from convneur_mm.analysis.timing import PeakMemoryGrowth, setup_benchmark_device, time_calls
from convneur_mm.utils.cli import positive_float, positive_int, writable_dir

M3 = dict(type='convneur_mm.ConvNeur', arch='m3', out_indices=(0, 1, 2, 3),
          gap_before_final_norm=False, memory_cfg=dict(chunk_size=4096, max_lr=1e-3))
MODELS = {
    'ConvNeur-M3': ('mmpretrain', M3),
    'ConvNeur-M3 local-only': ('mmpretrain', dict(M3, memory_placement='none')),
    'ConvNeur-M3 attention': ('mmpretrain', dict(M3, global_mixer='attention')),
    'ConvNeur-M3 CBAM': ('mmpretrain', dict(M3, global_mixer='cbam')),
    'ConvNeur-M3 Non-local': ('mmpretrain', dict(M3, global_mixer='nonlocal')),
    'ConvNeur-M3 IR-RWKV': ('mmpretrain', dict(M3, global_mixer='rwkv')),
    'ConvNeur-M3 Titans': ('mmpretrain', dict(M3, global_mixer='titans')),
    'Swin-T': ('mmpretrain', dict(type='SwinTransformer', arch='tiny', pad_small_map=True,
                                  out_indices=(0, 1, 2, 3))),
}


@torch.inference_mode()
def measure(name: str, size: Sequence[int], device: str, iters: int) -> Dict:
    """The fastest of ``iters`` backbone forwards at ``size`` (H, W) after a
    warm-up one, and the peak memory they add (run it in a fresh process)."""
    import convneur_mm  # noqa: F401
    from mmengine.registry import init_default_scope
    setup_benchmark_device(device)
    scope, cfg = MODELS[name]
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg).to(device)
    model.eval()  # some toolbox backbones' train() returns None
    x = torch.randn(1, 3, *size, device=device)
    memory = PeakMemoryGrowth(device)
    times = time_calls(lambda: model(x), iters, device, warmup=1)
    return dict(name=name, size=list(size), seconds=min(times), peak_mb=memory.mib())


def fit_exponent(points: List[Tuple[float, float]]) -> Optional[float]:
    """Least-squares slope of log(time) against log(pixels); None unless the
    points span at least 2x in pixels (1024^2 and 800x1333 alone differ by 2%,
    and their slope is noise)."""
    pixels = [p for p, _ in points]
    if len(points) < 2 or max(pixels) < 2 * min(pixels):
        return None
    xs = [math.log(p) for p, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def predict(done: List[Tuple[float, float]], pixels: float) -> Optional[float]:
    """Extrapolate a measure to ``pixels`` from the sizes measured so far,
    never assuming better than linear growth; None before two usable sizes."""
    exponent = fit_exponent(done) if len(done) >= 2 else None
    if exponent is None:
        return None
    # fit over every size so far: the last two may hold nearly the same
    # pixel count (1024^2 and 800x1333), whose slope says nothing
    return done[-1][1] * (pixels / done[-1][0]) ** max(exponent, 1.0)


def run_all(models: Sequence[str], sizes: Sequence[int], device: str, iters: int = 2,
            max_seconds: float = 120.0, max_memory_mb: float = 12000.0,
            detection_size: bool = True, log: Callable[[str], None] = print) -> List[Dict]:
    """Each model at each square size and (``detection_size``) COCO's
    800x1333, smallest first, each
    (model, size) in its own process; a size whose time per forward or peak
    memory, extrapolated from the smaller ones, exceeds ``max_seconds`` or
    ``max_memory_mb`` is skipped with its prediction; a size whose process
    fails is recorded with the error."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f'unknown models {unknown}; known: {list(MODELS)}')
    shapes = [(s, s) for s in sorted(sizes)] + ([(800, 1333)] if detection_size else [])
    shapes.sort(key=lambda s: s[0] * s[1])
    results = []
    for name in models:
        times: List[Tuple[float, float]] = []
        peaks: List[Tuple[float, float]] = []
        for shape in shapes:
            pixels = shape[0] * shape[1]
            seconds, peak = predict(times, pixels), predict(peaks, pixels)
            if (seconds or 0) > max_seconds or (peak or 0) > max_memory_mb:
                results.append(dict(name=name, size=list(shape), skipped=seconds,
                                    skipped_mb=peak))
                log(f'{name} {shape}: skipped (predicted {seconds or 0:.0f} s, '
                    f'{peak or 0:.0f} MB)')
                continue
            try:
                result = run_isolated(measure, dict(
                    name=name, size=list(shape), device=device, iters=iters))
            except RuntimeError as error:
                results.append(dict(name=name, size=list(shape),
                                    error=str(error).strip().splitlines()[-1][:200]))
                continue
            results.append(result)
            times.append((pixels, result['seconds']))
            peaks.append((pixels, max(result['peak_mb'], 1.0)))
            log(f'{name} {shape}: {result["seconds"]:.2f}s, {result["peak_mb"]:.0f} MB')
    return results


def summarize(results: List[Dict]) -> Dict[str, Dict]:
    """Per model: the exponents of time and peak memory in pixels, t(2048^2) / t(1024^2)."""
    summary = {}
    for name in dict.fromkeys(r['name'] for r in results):
        rows = {tuple(r['size']): r for r in results if r['name'] == name and 'seconds' in r}
        square = {s: r for s, r in rows.items() if s[0] == s[1]}
        ratio = None
        if (2048, 2048) in rows and (1024, 1024) in rows:
            ratio = rows[(2048, 2048)]['seconds'] / rows[(1024, 1024)]['seconds']
        summary[name] = dict(
            exponent=fit_exponent([(s[0] * s[1], r['seconds']) for s, r in square.items()]),
            memory_exponent=fit_exponent([(s[0] * s[1], r['peak_mb']) for s, r in square.items()
                                          if r['peak_mb'] > 0]),
            ratio_2048_1024=ratio)
    return summary


def table(results: List[Dict], summary: Dict[str, Dict]) -> str:
    """Markdown: every (model, size) row, then the fitted exponents."""
    lines = ['| model | input | time (s) | peak mem (MB) |', '|---|---|---|---|']
    for r in results:
        size = f'{r["size"][0]}x{r["size"][1]}'
        if 'seconds' in r:
            lines.append(f'| {r["name"]} | {size} | {r["seconds"]:.3f} | {r["peak_mb"]:.0f} |')
        elif 'skipped' in r:
            lines.append(f'| {r["name"]} | {size} | skipped (predicted {r["skipped"]:.0f} s) '
                         f'| (predicted {r["skipped_mb"]:.0f}) |')
        else:
            lines.append(f'| {r["name"]} | {size} | failed: {r["error"]} | - |')
    lines += ['', '| model | time ~ pixels^k, k = | peak memory ~ pixels^k, k = '
              '| t(2048^2) / t(1024^2) |', '|---|---|---|---|']

    def fmt(value):
        return '-' if value is None else f'{value:.2f}'

    for name, s in summary.items():
        lines.append(f'| {name} | {fmt(s["exponent"])} | {fmt(s["memory_exponent"])} '
                     f'| {fmt(s["ratio_2048_1024"])} |')
    return '\n'.join(lines)


def plot(results: List[Dict], path: str, device: str) -> None:
    """Measured points joined by lines; skipped sizes as hollow markers at
    their predicted values."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in dict.fromkeys(r['name'] for r in results):
        rows = sorted(((r['size'][0] * r['size'][1] / 1e6, r) for r in results
                       if r['name'] == name and 'seconds' in r), key=lambda t: t[0])
        if not rows:
            continue
        mp = [p for p, _ in rows]
        line, = axes[0].plot(mp, [r['seconds'] for _, r in rows], 'o-', label=name)
        axes[1].plot(mp, [r['peak_mb'] for _, r in rows], 'o-', color=line.get_color())
        skipped = [r for r in results if r['name'] == name and r.get('skipped')]
        for r in skipped:
            x = r['size'][0] * r['size'][1] / 1e6
            axes[0].plot(x, r['skipped'], 'o', mfc='none', color=line.get_color())
            if r.get('skipped_mb') is not None:  # results saved before it was predicted
                axes[1].plot(x, r['skipped_mb'], 'o', mfc='none', color=line.get_color())
    for ax, ylabel in zip(axes, ('forward time (s)', 'peak memory (MB)')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('input megapixels')
        ax.set_ylabel(ylabel)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=7)
    # The device line is long (CPU flags, malloc tuning): wrapped to the figure's
    # width (tight_layout leaves the suptitle's lines their room).
    fig.suptitle(textwrap.fill(f'Backbone forward, batch 1 (hollow: predicted, skipped). '
                               f'{device}', 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------- the case
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``resolution`` case's options."""
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--sizes', type=positive_int, nargs='+',
                        default=[224, 512, 1024, 1536, 2048])
    parser.add_argument('--max-forward-s', type=positive_float, default=120.0,
                        help='skip sizes predicted to take longer per forward')
    parser.add_argument('--max-memory-mb', type=positive_float, default=12000.0,
                        help='skip sizes predicted to need more peak memory')
    parser.add_argument('--iters', type=positive_int, default=2)
    parser.add_argument('--out-dir', type=writable_dir, default='work_dirs/resolution_scaling',
                        help='where the figure goes')


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``run_all`` with the parsed options, its table and figure (a dry run:
    local-only at 32 and 64 pixels, one iteration)."""
    device = setup_benchmark_device(args.device)  # workers inherit the malloc tuning
    if args.dry_run:
        args.models, args.sizes, args.iters = ['ConvNeur-M3 local-only'], [32, 64], 1
    results = run_all(args.models, args.sizes, args.device, args.iters, args.max_forward_s,
                      args.max_memory_mb, detection_size=not args.dry_run,
                      log=lambda text: print(text, file=sys.stderr, flush=True))
    summary = summarize(results)
    print(f'Device: {device}\n\n{table(results, summary)}')
    os.makedirs(args.out_dir, exist_ok=True)
    figure = osp.join(args.out_dir, 'resolution_scaling.png')
    plot(results, figure, device)
    print(f'\nplot: {figure}')
    return dict(device=device, results=results, summary=summary, figure=figure)
