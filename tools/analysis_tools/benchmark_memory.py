"""Forward+backward time of one memory branch: our closed-form path vs the
autograd reference and titans-pytorch's NeuralMemory.

    python tools/analysis_tools/benchmark_memory.py [--device cpu] [--update parallel]
        [--compile] [--repeats 7]

Default size: ConvNeur-M3 stage 1 at 224x224 (batch 8, 56x56 tokens, C_m 128,
chunk 196). The reference is the plain per-chunk loop with
``torch.autograd.grad(create_graph=True)`` that the tests check the fast path
against; both are timed in the same process, taking turns, and the ratio is
printed. CPU runs use the malloc tuning of ``convneur_mm.utils.cpu_malloc``
(``CONVNEUR_MALLOC_TUNING=0`` times glibc's defaults).

It also prints what bounds the ratio: the matrix-product FLOPs of each path
(forward and backward, counted by ``torch.utils.flop_counter``) and the time
the fast path spends in them (profiled). Any implementation that executes the
same matrix products at the same rate needs at least that time, so
``reference time / fast path's GEMM time`` is the largest speed-up available
without changing the maths or the GEMM kernels; at the device's best GEMM rate
(one large product timed in the same run) the bound holds for any kernels.

titans-pytorch (the implementation a user would otherwise reach for) is an
optional benchmark dependency, not installed by ``tools/setup/setup_env.sh``:
``pip install --no-deps -r requirements/optional/titans.txt`` (its
dependencies pinned there, none of which changes torch). When it is installed
its ``NeuralMemory`` is timed in the same run with the same shapes and the
same features: one head, momentum, attention-pooled chunks, per-parameter
learning-rate modulation, a 2-layer MLP memory with 4x expansion, RMS-normed
queries and keys. Its model is ours (x + LN(gelu(x W1) W2)(1 + g)); it takes
the inner gradients with ``torch.func`` (vmap of grad) and scans with
``assoc_scan``. Without it the column is skipped with a message. ``--compile``
adds our path and titans-pytorch's under ``torch.compile`` (compiled
against compiled: titans-pytorch compiles without graph breaks in torch
2.13).
"""
import argparse
import os.path as osp
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from convneur_mm.models.layers.neural_memory import NeuralMemory  # noqa: E402
from convneur_mm.analysis.bench_env import (peak_gemm_rate, setup_benchmark_device,  # noqa: E402
                                         synchronize)
from convneur_mm.utils.cli import positive_int  # noqa: E402
from convneur_mm.analysis.op_profile import MATRIX_PRODUCTS, profile_call  # noqa: E402
from convneur_mm.testing.memory_reference import reference_memory  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=positive_int, default=8)
    parser.add_argument('--tokens', type=positive_int, default=56 * 56)
    parser.add_argument('--dim', type=positive_int, default=128)
    parser.add_argument('--chunk', type=positive_int, default=196)
    parser.add_argument('--update', choices=['parallel', 'sequential'], default='parallel')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=positive_int, default=7)
    parser.add_argument('--compile', action='store_true',
                        help='also time our path (and titans-pytorch) under torch.compile')
    return parser.parse_args(argv)


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
    return min(profile_call(step, device)[MATRIX_PRODUCTS] for _ in range(calls))


def _step(memory: nn.Module, fn: Callable, x: torch.Tensor, device: str) -> None:
    """One forward + backward of ``fn(memory, x)``."""
    memory.zero_grad(set_to_none=True)
    x.grad = None
    fn(memory, x).square().mean().backward()
    synchronize(device)


def _inference(memory: nn.Module, fn: Callable, x: torch.Tensor, device: str) -> None:
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
               repeats: int, device: str, step: Callable = _step) -> Dict[str, float]:
    """Median seconds of ``step`` (forward + backward by default) per path.

    The paths take turns, so that a drift in the machine's load (a shared
    VM's neighbours) slows all alike instead of skewing their ratios.
    """
    times = {name: [] for name in paths}
    for name, (module, fn) in paths.items():
        step(module, fn, x, device)  # warm-up (and compilation)
    for _ in range(repeats):
        for name, (module, fn) in paths.items():
            start = time.perf_counter()
            step(module, fn, x, device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def titans_report(name: str, flops: Dict[str, float], train: Dict[str, float],
                  infer: Dict[str, float]) -> List[str]:
    """Ours against titans-pytorch (``name``): eager, both compiled when both
    were timed compiled, and their matrix-product FLOPs."""
    ours = 'ours (closed form, scan)'
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


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    device = setup_benchmark_device(args.device)
    torch.manual_seed(0)
    memory = NeuralMemory(args.dim, chunk_size=args.chunk, update=args.update).to(args.device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=args.device, requires_grad=True)
    paths = {'ours (closed form, scan)': (memory, lambda m, t: m(t)),
             'autograd reference': (memory, _with_grad(reference_memory))}
    if args.compile:
        compiled = torch.compile(memory)
        paths['ours, torch.compile'] = (memory, lambda m, t: compiled(t))
    titans, titans_name = titans_memory(args.dim, args.chunk)
    if titans is None:
        print(f'skipped the titans-pytorch column: {titans_name}', file=sys.stderr)
    else:
        titans = titans.to(args.device)
        paths[titans_name] = (titans, lambda m, t: m(t)[0])
        if args.compile:  # the peer compiled too: compiled against compiled
            compiled_titans = torch.compile(titans)
            paths[f'{titans_name}, torch.compile'] = (titans,
                                                      lambda m, t: compiled_titans(t)[0])
    train = time_paths(paths, x, args.repeats, args.device)
    infer = time_paths(paths, x, args.repeats, args.device, step=_inference)
    ours, ref = paths['ours (closed form, scan)'], paths['autograd reference']
    flops = {'ours': gemm_flops(lambda: _step(*ours, x, args.device)),
             'reference': gemm_flops(lambda: _step(*ref, x, args.device))}
    if titans is not None:
        flops['titans'] = gemm_flops(lambda: _step(*paths[titans_name], x, args.device))
        titans_gemm = gemm_seconds(lambda: _step(*paths[titans_name], x, args.device),
                                   args.device)
    fast_gemm = gemm_seconds(lambda: _step(*ours, x, args.device), args.device)
    best_rate = peak_gemm_rate(args.device)
    fast, slow = train['ours (closed form, scan)'], train['autograd reference']
    print(f'memory branch, batch {args.batch}, {args.tokens} tokens, C_m {args.dim}, chunk '
          f'{args.chunk}, {args.update} update, on {device}')
    print(f'median of {args.repeats} interleaved runs per path; ratios: path time / ours')
    print('| path | params | fwd+bwd (ms) | ours faster by | inference (ms) | ours faster by |')
    print('|---|---|---|---|---|---|')
    for name, (module, _) in paths.items():
        print(f'| {name} | {_params(module) / 1e3:.0f}k | {train[name] * 1e3:.1f} | '
              f'{train[name] / fast:.2f}x | {infer[name] * 1e3:.1f} | '
              f'{infer[name] / infer["ours (closed form, scan)"]:.2f}x |')
    print('\nGEMM GFLOP per fwd+bwd: ' + ', '.join(
        f'{name} {count / 1e9:.1f}' for name, count in flops.items()))
    print(f'speed-up over the reference: {slow / fast:.2f}x')
    print(f'ours in matrix products: {fast_gemm * 1e3:.1f} ms '
          f'({fast_gemm / fast:.0%} of its time, profiled, best of 3)')
    print(f'speed-up bound at these GEMMs and this GEMM rate (reference time / our '
          f'GEMM time): {slow / fast_gemm:.2f}x')
    floor = flops['ours'] / best_rate
    print(f'at the device\'s best GEMM rate ({best_rate / 1e9:.0f} GFLOP/s, a 2048^3 '
          f'product) these GEMMs take at least {floor * 1e3:.1f} ms: bound '
          f'{slow / floor:.2f}x over the reference')
    if titans is not None:
        print(f'{titans_name} in matrix products: {titans_gemm * 1e3:.1f} ms '
              f'({titans_gemm / train[titans_name]:.0%} of its time, profiled, best of 3)')
        print('\n'.join(titans_report(titans_name, flops, train, infer)))


if __name__ == '__main__':
    main()
