"""The neural memory's cost: its branch against the autograd reference and
titans-pytorch, and a whole backbone's inference memory and throughput
against its local-only network (and an older checkout).

``paths_benchmark``: forward + backward and inference time of one memory
(default: ConvNeur-M3 stage 1 at 224x224: batch 8, 56x56 tokens, C_m 128,
chunk 196): our closed-form path, the plain per-chunk loop with
``torch.autograd.grad(create_graph=True)`` that the tests check it against,
and titans-pytorch's ``NeuralMemory`` where installed (an optional benchmark
dependency: ``pip install --no-deps -r requirements/optional/titans.txt``),
configured with our features (one head, momentum, attention-pooled chunks,
per-parameter learning-rate modulation, a 2-layer MLP memory with 4x
expansion, RMS-normed queries and keys). The paths take turns. It also gives
what bounds the ratio: the matrix-product FLOPs of each path
(``torch.utils.flop_counter``) and the time the fast path spends in them
(profiled): ``reference time / fast path's GEMM time`` is the largest
speed-up without changing the maths or the GEMM kernels; at the device's best
GEMM rate (one large product timed in the same run) the bound holds for any
kernels.

``backbone_benchmark`` (float32, CPU): the peak resident-set growth of one
inference forward (``timing.PeakMemoryGrowth``, after a warm-up pass) of
the arch's local-only network, of the arch, and of the arch with
``memory_cfg.working_set_mib`` (image slices); then its throughput, against
the package of an older checkout if given. Each measurement runs in a fresh
process (``isolated.run_isolated``, with ``checkout`` for the older one), the
codes taking turns round by round.

The runner's cases: ``memory-paths`` and ``memory-backbone``.
"""
import argparse
import functools
import sys
import os.path as osp
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from convneur_mm.analysis.timing import (PeakMemoryGrowth, RegionTimer, median, peak_gemm_rate,
                                         setup_benchmark_device, synchronize, time_in_turns)
from convneur_mm.analysis.isolated import run_isolated
from convneur_mm.utils.cli import positive_int

if TYPE_CHECKING:  # not at run time: a child of an older checkout loads this file alone
    from benchmarks.common.record import Record

OURS, REFERENCE = 'ours (closed form, scan)', 'autograd reference'


def titans_memory(dim: int, chunk: int) -> Tuple[Optional[nn.Module], str]:
    """titans-pytorch's NeuralMemory with our features and its name, or None and why."""
    try:
        import titans_pytorch
        from titans_pytorch import NeuralMemory as TitansMemory
    except ImportError as error:
        return None, (f'titans-pytorch is not installed ({error}); install it with '
                      '`pip install --no-deps -r requirements/optional/titans.txt`')
    version = getattr(titans_pytorch, '__version__', None) or _dist_version('titans-pytorch')
    module = TitansMemory(dim, chunk_size=chunk, heads=1, momentum=True, attn_pool_chunks=True,
                          per_parameter_lr_modulation=True, qk_rmsnorm=True,
                          default_model_kwargs=dict(depth=2, expansion_factor=4.0))
    return module, f'titans-pytorch {version}'


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def gemm_flops(step: Callable[[], None]) -> int:
    """FLOPs of the matrix products (and convolutions) one call of ``step`` runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def gemm_seconds(step: Callable[[], None], device: str, calls: int = 3) -> float:
    """Seconds one call of ``step`` spends inside matrix-product kernels, the
    least of ``calls`` profiled calls."""
    from convneur_mm.analysis.op_profile import MATRIX_PRODUCTS, profile_call
    return min(profile_call(step, device)[MATRIX_PRODUCTS] for _ in range(calls))


def train_step(memory: nn.Module, fn: Callable, x: torch.Tensor, device: str) -> None:
    """One forward + backward of ``fn(memory, x)``."""
    memory.zero_grad(set_to_none=True)
    x.grad = None
    fn(memory, x).square().mean().backward()
    synchronize(device)


def inference_step(memory: nn.Module, fn: Callable, x: torch.Tensor, device: str) -> None:
    with torch.no_grad():
        fn(memory, x)
    synchronize(device)


def _with_grad(fn: Callable) -> Callable:
    """``fn`` with autograd on: the reference's memory writes are gradient
    steps (``torch.autograd.grad``), also when the timing is inference."""
    def call(memory: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return fn(memory, x)
    return call


def time_paths(paths: Dict[str, Tuple[nn.Module, Callable]], x: torch.Tensor,
               repeats: int, device: str, step: Callable = train_step) -> Dict[str, float]:
    """Median seconds of ``step`` (forward + backward by default) per path.

    The paths take turns, so that a drift in the machine's load (a shared
    VM's neighbours) slows all alike instead of skewing their ratios.
    """
    calls = {name: functools.partial(step, module, fn, x, device)
             for name, (module, fn) in paths.items()}
    # one untimed turn first: warm-up (and compilation)
    times = time_in_turns(calls, repeats, device, warmup=1)
    return {name: median(t) for name, t in times.items()}


def titans_report(name: str, flops: Dict[str, float], train: Dict[str, float],
                  infer: Dict[str, float]) -> List[str]:
    """Ours against titans-pytorch (``name``): eager, both compiled when both
    were timed compiled, and their matrix-product FLOPs."""
    ours = OURS
    lines = [f'vs {name}: ours {train[name] / train[ours]:.2f}x faster forward+backward '
             f'(target >= 2x), {infer[name] / infer[ours]:.2f}x inference',
             f'{name} runs {flops["titans"] / flops["ours"]:.2f}x our matrix-product FLOPs '
             '(forward+backward)']
    ours_c, titans_c = 'ours, torch.compile', f'{name}, torch.compile'
    if ours_c in train and titans_c in train:
        lines.append(f'both compiled: ours {train[titans_c] / train[ours_c]:.2f}x faster '
                     f'forward+backward, {infer[titans_c] / infer[ours_c]:.2f}x inference')
    return lines


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def paths_benchmark(device: str, batch: int = 8, tokens: int = 56 * 56, dim: int = 128,
                    chunk: int = 196, update: str = 'parallel', repeats: int = 7,
                    compile: bool = False, gemm_size: int = 2048,
                    log: Callable[[str], None] = print) -> Dict:
    """Our memory against the autograd reference and titans-pytorch.

    Args:
        device: where it runs (``setup_benchmark_device`` already called).
        batch, tokens, dim, chunk, update: the memory and its input.
        repeats: timed turns per path.
        compile: also our path (and titans-pytorch) under ``torch.compile``.
        gemm_size: the side of the product that measures the device's best rate.
        log: gets the reason the titans-pytorch column is skipped.

    Returns:
        ``train``, ``infer`` (median seconds per path), ``params`` (per path),
        ``flops`` (GEMM FLOPs per forward + backward: ours, reference, titans),
        ``gemm_s`` (seconds in matrix products: ours, titans), ``gemm_rate``
        (the device's best FLOP/s), ``titans`` (its name, or None) and the sizes.
    """
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    from convneur_mm.testing.memory_reference import reference_memory
    torch.manual_seed(0)
    memory = NeuralMemory(dim, chunk_size=chunk, update=update).to(device)
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    paths = {OURS: (memory, lambda m, t: m(t)),
             REFERENCE: (memory, _with_grad(reference_memory))}
    if compile:
        compiled = torch.compile(memory)
        paths['ours, torch.compile'] = (memory, lambda m, t: compiled(t))
    titans, titans_name = titans_memory(dim, chunk)
    if titans is None:
        log(f'skipped the titans-pytorch column: {titans_name}')
    else:
        titans = titans.to(device)
        paths[titans_name] = (titans, lambda m, t: m(t)[0])
        if compile:  # the peer compiled too: compiled against compiled
            compiled_titans = torch.compile(titans)
            paths[f'{titans_name}, torch.compile'] = (titans,
                                                      lambda m, t: compiled_titans(t)[0])
    train = time_paths(paths, x, repeats, device)
    infer = time_paths(paths, x, repeats, device, step=inference_step)

    def step_of(name):
        return lambda: train_step(*paths[name], x, device)
    flops = {'ours': gemm_flops(step_of(OURS)), 'reference': gemm_flops(step_of(REFERENCE))}
    gemm_s = {'ours': gemm_seconds(step_of(OURS), device)}
    if titans is not None:
        flops['titans'] = gemm_flops(step_of(titans_name))
        gemm_s['titans'] = gemm_seconds(step_of(titans_name), device)
    return dict(batch=batch, tokens=tokens, dim=dim, chunk=chunk, update=update,
                repeats=repeats, train=train, infer=infer,
                params={name: _params(module) for name, (module, _) in paths.items()},
                flops=flops, gemm_s=gemm_s, gemm_rate=peak_gemm_rate(device, gemm_size),
                gemm_size=gemm_size,
                titans=None if titans is None else titans_name)


def paths_report(r: Dict, device: str) -> str:
    """The table and bounds of ``paths_benchmark``'s result ``r``."""
    train, infer, flops = r['train'], r['infer'], r['flops']
    fast, slow, fast_gemm = train[OURS], train[REFERENCE], r['gemm_s']['ours']
    lines = [f'memory branch, batch {r["batch"]}, {r["tokens"]} tokens, C_m {r["dim"]}, chunk '
             f'{r["chunk"]}, {r["update"]} update, on {device}',
             f'median of {r["repeats"]} interleaved runs per path; ratios: path time / ours',
             '| path | params | fwd+bwd (ms) | ours faster by | inference (ms) | ours faster by |',
             '|---|---|---|---|---|---|']
    for name in train:
        lines.append(f'| {name} | {r["params"][name] / 1e3:.0f}k | {train[name] * 1e3:.1f} | '
                     f'{train[name] / fast:.2f}x | {infer[name] * 1e3:.1f} | '
                     f'{infer[name] / infer[OURS]:.2f}x |')
    floor = flops['ours'] / r['gemm_rate']
    lines += ['', 'GEMM GFLOP per fwd+bwd: ' + ', '.join(
        f'{name} {count / 1e9:.1f}' for name, count in flops.items()),
        f'speed-up over the reference: {slow / fast:.2f}x',
        f'ours in matrix products: {fast_gemm * 1e3:.1f} ms '
        f'({fast_gemm / fast:.0%} of its time, profiled, best of 3)',
        f'speed-up bound at these GEMMs and this GEMM rate (reference time / our '
        f'GEMM time): {slow / fast_gemm:.2f}x',
        f'at the device\'s best GEMM rate ({r["gemm_rate"] / 1e9:.0f} GFLOP/s, a '
        f'{r["gemm_size"]}^3 '
        f'product) these GEMMs take at least {floor * 1e3:.1f} ms: bound '
        f'{slow / floor:.2f}x over the reference']
    if r['titans'] is not None:
        name, titans_gemm = r['titans'], r['gemm_s']['titans']
        lines.append(f'{name} in matrix products: {titans_gemm * 1e3:.1f} ms '
                     f'({titans_gemm / train[name]:.0%} of its time, profiled, best of 3)')
        lines += titans_report(name, flops, train, infer)
    return '\n'.join(lines)


def backbone_child(arch: str, variant: str, batch: int, size: int, measure: str,
                   working_set_mib: Optional[int] = None, repeats: int = 1) -> Dict:
    """One measurement of a whole backbone in inference, in this process:
    ``peak`` (``mib`` of resident-set growth over a forward pass after a
    warm-up one) or ``time`` (``seconds`` of each of ``repeats`` forward
    passes). ``variant``: 'local-only' or 'model'."""
    from convneur_mm.models import ConvNeur
    setup_benchmark_device('cpu')
    kwargs = dict(arch=arch)
    if variant == 'local-only':
        kwargs['memory_placement'] = 'none'
    if working_set_mib:
        kwargs['memory_cfg'] = dict(working_set_mib=working_set_mib)
    torch.manual_seed(0)
    model = ConvNeur(**kwargs).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        model(x)  # warm-up
        if measure == 'peak':
            window = PeakMemoryGrowth('cpu')
            model(x)
            return dict(mib=window.mib())
        times = []
        for _ in range(repeats):
            timer = RegionTimer('cpu')
            timer.start('forward')
            model(x)
            timer.stop('forward')
            times.append(timer.seconds())
    return dict(seconds=times)


def backbone_benchmark(arch: str, batch: int = 16, size: int = 224, working_set_mib: int = 64,
                       before: Optional[str] = None, rounds: int = 3,
                       repeats: int = 3) -> Dict:
    """Peak growth of local-only, of the model and of the model with
    ``working_set_mib`` (and of ``before``'s model); then the throughput of
    the model, sliced and not, against ``before``'s, each measurement in a
    fresh process, the processes taking turns round by round.

    Args:
        arch: the ConvNeur arch.
        batch, size: the input.
        working_set_mib: the sliced variant's ``memory_cfg.working_set_mib``.
        before: a checkout whose package is measured too (``isolated.run_isolated``).
        rounds: interleaved rounds of timing processes.
        repeats: forward passes per timing process.

    Returns:
        ``peaks`` (name -> MiB), ``seconds`` (name -> every timed pass),
        ``medians`` (name -> s), the settings.
    """
    def child(root=None, **spec):
        spec = dict(dict(arch=arch, batch=batch, size=size), **spec)
        if root is None:
            return run_isolated(backbone_child, spec)
        # the measuring modules from this tree, the measured package from ``root``
        return run_isolated(backbone_child, spec, checkout=root, own_modules=(
            'convneur_mm.analysis.timing', 'convneur_mm.analysis.isolated'))

    sliced = f'{arch}, working_set_mib {working_set_mib}'
    variants = {'local-only': dict(variant='local-only'), arch: dict(variant='model'),
                sliced: dict(variant='model', working_set_mib=working_set_mib)}
    if before:
        variants[f'{arch}, before ({before})'] = dict(variant='model', root=osp.abspath(before))
    peaks = {name: child(**v, measure='peak')['mib'] for name, v in variants.items()}
    timed = {arch: dict(variant='model'),
             sliced: dict(variant='model', working_set_mib=working_set_mib)}
    if before:
        timed[f'{arch}, before'] = dict(variant='model', root=osp.abspath(before))
    seconds: Dict[str, List[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        for name, spec in timed.items():
            seconds[name] += child(**spec, measure='time', repeats=repeats)['seconds']
    return dict(arch=arch, batch=batch, size=size, rounds=rounds, repeats=repeats,
                before=before, peaks=peaks, seconds=seconds,
                medians={name: median(t) for name, t in seconds.items()})


def backbone_report(r: Dict, device: str) -> str:
    """The tables of ``backbone_benchmark``'s result ``r``."""
    arch, peaks, medians = r['arch'], r['peaks'], r['medians']
    lines = [f'ConvNeur-{arch.upper()} inference, batch {r["batch"]} at '
             f'{r["size"]}x{r["size"]}, float32, on {device}, torch {torch.__version__}',
             '| variant | peak memory growth (MiB) | / local-only |', '|---|---|---|']
    for name, mib in peaks.items():
        lines.append(f'| {name} | {mib:.0f} | {mib / peaks["local-only"]:.2f}x |')
    lines += ['', f'throughput: median of {r["rounds"]} interleaved rounds x {r["repeats"]} '
              'forward passes, one process per round and variant',
              '| code | s / batch | img/s |', '|---|---|---|']
    for name, sec in medians.items():
        lines.append(f'| {name} | {sec:.3f} | {r["batch"] / sec:.1f} |')
    if r['before']:
        lines.append(f'this tree / before: {medians[f"{arch}, before"] / medians[arch]:.3f}x '
                     'the throughput')
    return '\n'.join(lines)


# ---------------------------------------------------------------- the cases
def add_paths_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``memory-paths`` case's options."""
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=positive_int, default=8)
    parser.add_argument('--repeats', type=positive_int, default=7, help='timed turns')
    parser.add_argument('--tokens', type=positive_int, default=56 * 56)
    parser.add_argument('--dim', type=positive_int, default=128)
    parser.add_argument('--chunk', type=positive_int, default=196)
    parser.add_argument('--update', choices=['parallel', 'sequential'], default='parallel')
    parser.add_argument('--compile', action='store_true', help='also under torch.compile')


def run_paths(args: argparse.Namespace, record: 'Record') -> Dict:
    """``paths_benchmark`` with the parsed options (a dry run: tiny sizes on
    the CPU); prints ``paths_report``."""
    device = 'cpu' if args.dry_run else args.device
    description = setup_benchmark_device(device)
    sizes = (dict(batch=2, tokens=64, dim=16, chunk=16, repeats=1, gemm_size=256)
             if args.dry_run else dict(batch=args.batch, tokens=args.tokens, dim=args.dim,
                                       chunk=args.chunk, repeats=args.repeats))
    result = paths_benchmark(device, update=args.update, compile=args.compile, log=_log,
                             **sizes)
    print(paths_report(result, description))
    return dict(result, device=description)


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``memory-backbone`` case's options."""
    parser.add_argument('--arch', default='m3')
    parser.add_argument('--batch', type=positive_int, default=8)
    parser.add_argument('--size', type=positive_int, default=224)
    parser.add_argument('--working-set-mib', type=positive_int, default=64)
    parser.add_argument('--before', metavar='PATH', help='also an older checkout')
    parser.add_argument('--rounds', type=positive_int, default=3)
    parser.add_argument('--repeats', type=positive_int, default=7,
                        help='forwards per timing process')


def run_backbone(args: argparse.Namespace, record: 'Record') -> Dict:
    """``backbone_benchmark`` (CPU) with the parsed options (a dry run: one
    32x32 image, one round); prints ``backbone_report``."""
    description = setup_benchmark_device('cpu')
    sizes = (dict(batch=1, size=32, rounds=1, repeats=1) if args.dry_run else
             dict(batch=args.batch, size=args.size, rounds=args.rounds, repeats=args.repeats))
    result = backbone_benchmark(args.arch, working_set_mib=args.working_set_mib,
                                before=args.before, **sizes)
    print(backbone_report(result, description))
    return dict(result, device=description)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
