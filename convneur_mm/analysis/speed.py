"""Throughput, latency, FLOPs, params and peak memory of ConvNeur and its peers.

All models are ImageNet classifiers in eval mode, built from MMPretrain
(ResNet-50, ConvNeXt, Swin-T), MMDetection (PVTv2-B1: MMPretrain has no PVT)
and our configs. Each model is measured in its own process
(``isolated.run_isolated``) so that its peak memory is its own; the ratios
come from one run. The protocol follows the OverLoCK paper's speed table:
throughput at batch 128 on a GPU (16 on a CPU) and latency at batch 1, 224x224.

The report also bounds ConvNeur-M3 by the device's best GEMM rate (one large
product timed in the same run): its local network's measured time (the
local-only ablation, in the same mode) plus its global branches' matrix-product
FLOPs at that rate, and M3's measured throughput as a fraction of that bound.

Modes: ``eager`` float32; ``bf16``, eager under bfloat16 autocast (the
memory's inner loop stays float32), with the relative error of its logits
against float32 on the same batch. The bound is a float32 bound. Compiled
throughput, measured against eager in turns, is ``compiled``'s.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from convneur_mm.analysis.timing import (PeakMemoryGrowth, RegionTimer, median,
                                         setup_benchmark_device, time_call, time_calls)
from convneur_mm.analysis.isolated import run_isolated
from convneur_mm.utils.tables import markdown_table

MODES = ('eager', 'bf16')

# name -> (config, cfg_options); 'mmdet-pvtv2-b1' is built by hand below
MODELS = {
    'ConvNeur-M1': ('cls_convneur_m1_300e_in1k.py', None),
    'ConvNeur-M2': ('cls_convneur_m2_300e_in1k.py', None),
    'ConvNeur-M3': ('cls_convneur_m3_300e_in1k.py', None),
    'ConvNeur-M4': ('cls_convneur_m4_300e_in1k.py', None),
    'ConvNeur-M3 local-only': ('cls_convneur_m3_300e_in1k.py',
                               {'model.backbone.memory_placement': 'none'}),
    'ResNet-50': ('mmpretrain::resnet/resnet50_8xb32_in1k.py', None),
    'ConvNeXt-V2-P': ('mmpretrain::convnext_v2/convnext-v2-pico_32xb32_in1k.py', None),
    'ConvNeXt-T': ('mmpretrain::convnext/convnext-tiny_32xb128_in1k.py', None),
    'Swin-T': ('mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py', None),
    'PVTv2-B1': ('mmdet-pvtv2-b1', None),
}


class _PVTv2Classifier(nn.Module):
    """MMDetection's PVTv2-B1 backbone + global pool + linear head."""

    def __init__(self):
        super().__init__()
        from mmdet.registry import MODELS as DET_MODELS
        from mmengine.registry import init_default_scope
        init_default_scope('mmdet')
        self.backbone = DET_MODELS.build(dict(
            type='PyramidVisionTransformerV2', embed_dims=64, num_layers=[2, 2, 2, 2]))
        self.head = nn.Linear(512, 1000)

    def forward(self, x):
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def build_classifier(name: str) -> Tuple[Callable, nn.Module]:
    """A function images -> logits, and the module holding the parameters."""
    config, options = MODELS[name]
    if config == 'mmdet-pvtv2-b1':
        model = _PVTv2Classifier()
        return model, model
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    cfg = load_config(config)
    if options:
        cfg.merge_from_dict(options)
    model = build_model(cfg, init=False)
    return (lambda x: model(x, mode='tensor')), model


def _timed(fn: Callable, x: torch.Tensor, iters: int, device: str) -> Tuple[List[float], float]:
    """Seconds of ``iters`` calls, and the seconds of the warm-up call before them."""
    warm_up = time_call(lambda: fn(x), device)
    return time_calls(lambda: fn(x), iters, device), warm_up


def _global_branch_seconds(model: nn.Module, fn: Callable, x: torch.Tensor, device: str
                           ) -> Tuple[float, List[Tuple[nn.Module, torch.Tensor]]]:
    """Device time spent inside ConvNeur's global branches during one forward
    (on CUDA timed by events around each branch, not by the host clock), and
    each branch with the input it got."""
    from convneur_mm.models.layers.global_branch import GlobalBranch
    timer, handles, inputs = RegionTimer(device), [], []

    def start(mod, args):
        inputs.append((mod, args[0]))
        timer.start(id(mod))

    for m in model.modules():
        if isinstance(m, GlobalBranch):
            handles.append(m.register_forward_pre_hook(start))
            handles.append(m.register_forward_hook(lambda mod, inp, out: timer.stop(id(mod))))
    try:
        fn(x)
    finally:
        for h in handles:
            h.remove()
    return timer.seconds(), inputs


def _global_branch_inputs(model: nn.Module, fn: Callable,
                          x: torch.Tensor) -> List[Tuple[nn.Module, torch.Tensor]]:
    """Each of ConvNeur's global branches with the input it gets from ``fn(x)``."""
    from convneur_mm.models.layers.global_branch import GlobalBranch
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0])))
             for m in model.modules() if isinstance(m, GlobalBranch)]
    try:
        fn(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def _global_branch_times(inputs: List[Tuple[nn.Module, torch.Tensor]],
                         device: str) -> Tuple[float, float]:
    """Seconds of one profiled call of ConvNeur's global branches on their
    ``inputs``: in their matrix products (the 1x1 projections run as oneDNN
    convolutions, so convolutions count too), and in all (``op_profile``'s
    categories summed)."""
    from convneur_mm.analysis import op_profile
    seconds = op_profile.profile_call(lambda: [mod(t) for mod, t in inputs], device)
    products = seconds[op_profile.MATRIX_PRODUCTS] + seconds[op_profile.CONVOLUTIONS]
    return products, sum(seconds.values())


def _in_mode(fn: Callable, mode: str, device: str) -> Callable:
    if mode != 'bf16':
        return fn
    device_type = torch.device(device).type

    def autocast_fn(x):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(x)
    return autocast_fn


def _relative_error(fn: Callable, reference: Callable, x: torch.Tensor) -> float:
    got, want = fn(x).float(), reference(x).float()
    return ((got - want).norm() / want.norm()).item()


@torch.inference_mode()
def measure(name: str, device: str, batch: int, iters: int, mode: str = 'eager',
            size: int = 224) -> Dict:
    """Every number about one model in one mode (run it in a fresh process:
    ``run_all``), at ``size`` x ``size``."""
    import convneur_mm  # noqa: F401
    from convneur_mm.models.layers.global_branch import GlobalBranch
    from convneur_mm.analysis.complexity import count_macs, count_params
    setup_benchmark_device(device)  # TF32 off on CUDA, in this process too
    torch.manual_seed(0)
    eager_fn, model = build_classifier(name)
    model = model.to(device)
    model.eval()  # some toolbox models' train() returns None
    one = torch.randn(1, 3, size, size, device=device)
    macs = count_macs(model, lambda: eager_fn(one))
    branch_macs = 0
    branches = [m for m in model.modules() if isinstance(m, GlobalBranch)]
    if branches:  # the branches' own full MACs, counted on their real inputs
        branch_macs = sum(count_macs(m, lambda m=m, t=t: m(t))['full']
                          for m, t in _global_branch_inputs(model, eager_fn, one))
    x = torch.randn(batch, 3, size, size, device=device)
    extra = {}
    if mode == 'bf16':
        extra['relative_error'] = _relative_error(_in_mode(eager_fn, mode, device), eager_fn, x)
    fn = _in_mode(eager_fn, mode, device)
    memory = PeakMemoryGrowth(device)
    through, warm_up = _timed(fn, x, iters, device)
    latency, _ = _timed(fn, one, max(iters, 5), device)
    peak_mb = memory.mib()
    seconds = median(through)
    branch_seconds, inputs = (_global_branch_seconds(model, fn, x, device)
                              if branches else (None, []))
    if branches and mode == 'eager':
        products, total = _global_branch_times(inputs, device)
        extra['branch_gemm_s_per_image'] = products / batch
        extra['branch_profiled_s_per_image'] = total / batch
    return dict(name=name, mode=mode, params=count_params(model), paper_macs=macs['paper'],
                full_macs=macs['full'], throughput=batch / seconds,
                latency_ms=median(latency) * 1e3, peak_mb=peak_mb,
                warm_up_s=warm_up,
                branch_time_share=(branch_seconds / seconds if branch_seconds is not None
                                   else None),
                branch_mac_share=branch_macs / macs['full'] if branches else None, **extra)


def m3_throughput_bound(local_throughput: float, branch_macs: float, gemm_rate: float) -> float:
    """Images/s that ConvNeur-M3 cannot exceed: its local network's time per
    image plus its global branches' MACs executed at ``gemm_rate`` FLOP/s."""
    return 1.0 / (1.0 / local_throughput + 2.0 * branch_macs / gemm_rate)


def throughput_batch(device: str, batch: Optional[int] = None) -> int:
    """``batch``, else the OverLoCK protocol's 128 on a GPU and 16 on a CPU."""
    if batch is not None:
        return batch
    return 128 if device.startswith('cuda') else 16


def run_all(models: Sequence[str], modes: Sequence[str], device: str, batch: int, iters: int,
            rounds: int = 1, size: int = 224, log: Callable[[str], None] = print) -> List[Dict]:
    """Every (model, mode) in its own process, ``rounds`` times in turns; each
    one's best round (``best_round``)."""
    unknown = [m for m in models if m not in MODELS] + [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f'unknown models or modes {unknown}; models: {list(MODELS)}, '
                         f'modes: {list(MODES)}')
    runs = [(name, mode) for mode in modes for name in models]
    results: Dict[Tuple[str, str], List[Dict]] = {run: [] for run in runs}
    for _ in range(rounds):
        for name, mode in runs:
            results[(name, mode)].append(run_isolated(measure, dict(
                name=name, device=device, batch=batch, iters=iters, mode=mode, size=size)))
            log(f'measured {name} ({mode})')
    return [best_round(r) for r in results.values()]


def _mib(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.0f}'


def best_round(results: List[Dict]) -> Dict:
    """One model's rounds: its best throughput and latency, its largest peak."""
    best = dict(max(results, key=lambda r: r['throughput']))
    best['latency_ms'] = min(r['latency_ms'] for r in results)
    peaks = [r['peak_mb'] for r in results if r['peak_mb'] is not None]
    best['peak_mb'] = max(peaks) if peaks else None
    best['rounds'] = len(results)
    return best


def report(results: List[Dict], device: str, batch: int,
           gemm_rate: Optional[float] = None, size: int = 224) -> str:
    """``device``: its description from ``setup_benchmark_device``;
    ``gemm_rate``: the device's best GEMM FLOP/s (``peak_gemm_rate``).
    One table per mode, then a comparison of the modes."""
    modes = [m for m in MODES if any(r.get('mode', 'eager') == m for r in results)]
    rounds = max(r.get('rounds', 1) for r in results)
    lines = [f'Device: {device}; throughput at batch {batch}, latency at '
             f'batch 1, {size}x{size}, eval mode; best of {rounds} round(s).']
    for mode in modes:
        lines += [''] + _mode_report([r for r in results if r.get('mode', 'eager') == mode],
                                     mode, gemm_rate)
    if len(modes) > 1:
        lines += [''] + _mode_comparison(results, modes)
    return '\n'.join(lines)


MODE_TITLES = {'eager': 'eager, float32',
               'bf16': 'eager, bfloat16 autocast (memory inner loop float32)'}


def _mode_report(results: List[Dict], mode: str, gemm_rate: Optional[float]) -> List[str]:
    by_name = {r['name']: r for r in results}
    ref = by_name.get('ResNet-50')
    rows = []
    for r in results:
        share = ('-' if r['branch_time_share'] is None else
                 f'{100 * r["branch_time_share"]:.0f}% / {100 * r["branch_mac_share"]:.0f}%')
        ratio = f'{r["throughput"] / ref["throughput"]:.2f}x' if ref else '-'
        rows.append((r['name'], f'{r["params"] / 1e6:.2f}', f'{r["paper_macs"] / 1e9:.2f}',
                     f'{r["full_macs"] / 1e9:.2f}', f'{r["throughput"]:.1f}', ratio,
                     f'{r["latency_ms"]:.1f}', _mib(r['peak_mb']), share))
    lines = [f'**{MODE_TITLES[mode]}**', '', markdown_table(
        ('model', 'params (M)', 'paper GMACs', 'full GMACs', 'throughput (img/s)',
         'vs ResNet-50', 'latency (ms)', 'peak mem (MB)', 'global-branch time / MAC share'),
        rows)]
    m3, local = by_name.get('ConvNeur-M3'), by_name.get('ConvNeur-M3 local-only')
    lines.append('')
    if m3 and local:
        wall = local['throughput'] / m3['throughput'] - 1
        paper = m3['paper_macs'] / local['paper_macs'] - 1
        full = m3['full_macs'] / local['full_macs'] - 1
        lines.append(f'ConvNeur-M3 over its local-only ablation: wall-time overhead '
                     f'{100 * wall:.0f}%, paper-FLOPs overhead {100 * paper:.0f}% '
                     f'(ratio {wall / paper:.2f}; target <= 1.5), full-MAC overhead '
                     f'{100 * full:.0f}%.')
    if m3 and ref:
        lines.append(f'ConvNeur-M3 throughput / ResNet-50: '
                     f'{m3["throughput"] / ref["throughput"]:.2f}x (target >= 1.5x).')
    if m3 and local and gemm_rate and mode == 'eager':
        branch_macs = m3['branch_mac_share'] * m3['full_macs']
        bound = m3_throughput_bound(local['throughput'], branch_macs, gemm_rate)
        lines.append(
            f'Bound: at this device\'s best GEMM rate ({gemm_rate / 1e9:.0f} GFLOP/s, a '
            f'2048^3 float32 product timed in this run) the global branches\' '
            f'{branch_macs / 1e9:.2f} GMACs per image add at least '
            f'{2e3 * branch_macs / gemm_rate:.1f} ms to the local network\'s '
            f'{1e3 / local["throughput"]:.1f} ms ({mode}): ConvNeur-M3 <= {bound:.1f} img/s'
            + (f' = {bound / ref["throughput"]:.2f}x ResNet-50' if ref else '') +
            f', wall-time overhead >= {100 * (local["throughput"] / bound - 1):.0f}%.')
        lines.append(f'ConvNeur-M3 measured / bound ({mode}): {m3["throughput"]:.1f} / '
                     f'{bound:.1f} = {m3["throughput"] / bound:.2f} (target >= 0.9).')
        if m3.get('branch_gemm_s_per_image'):
            lines.append(_gemm_shape_bound(m3, local, branch_macs, gemm_rate))
    return lines


def _gemm_shape_bound(m3: Dict, local: Dict, branch_macs: float, gemm_rate: float) -> str:
    """Where the eager gap to the bound goes: the global branches' matrix
    products at their own shapes (profiled), against the rest of their time."""
    gemm = m3['branch_gemm_s_per_image']
    rest = m3['branch_profiled_s_per_image'] - gemm
    own_bound = 1.0 / (1.0 / local['throughput'] + gemm)
    return (f'Where the gap goes (the global branches profiled in one call): their matrix '
            f'products and 1x1 projections take {1e3 * gemm:.1f} ms per image at their own '
            f'shapes ({2 * branch_macs / gemm / 1e9:.0f} GFLOP/s against the 2048^3 '
            f'product\'s {gemm_rate / 1e9:.0f}), everything else in them '
            f'{1e3 * rest:.1f} ms. With those products at their own rate and nothing else, '
            f'ConvNeur-M3 <= {own_bound:.1f} img/s: measured / that = '
            f'{m3["throughput"] / own_bound:.2f}.')


def _mode_comparison(results: List[Dict], modes: List[str]) -> List[str]:
    """Throughput per mode, speed-ups over eager, bf16's error."""
    table: Dict[str, Dict[str, Dict]] = {}
    for r in results:
        table.setdefault(r['name'], {})[r.get('mode', 'eager')] = r
    head = ['model'] + [f'{m} (img/s)' for m in modes]
    head += [f'{m} / eager' for m in modes if m != 'eager'] if 'eager' in modes else []
    head += ['bf16 logits rel. error'] if 'bf16' in modes else []
    rows = []
    for name, per_mode in table.items():
        cells = [name] + [f'{per_mode[m]["throughput"]:.1f}' if m in per_mode else '-'
                          for m in modes]
        if 'eager' in modes:
            eager = per_mode.get('eager')
            cells += [f'{per_mode[m]["throughput"] / eager["throughput"]:.2f}x'
                      if eager and m in per_mode else '-' for m in modes if m != 'eager']
        if 'bf16' in modes:
            cells.append(f'{100 * per_mode["bf16"]["relative_error"]:.2f}%'
                         if 'bf16' in per_mode else '-')
        rows.append(cells)
    return ['**modes compared** (throughput at the batch above; ratios from this run)', '',
            markdown_table(head, rows)]
