"""Forward+backward time of one memory branch: fast path vs autograd reference.

    python tools/analysis_tools/benchmark_memory.py [--device cpu] [--update parallel]

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
"""
import argparse
import os.path as osp
import sys
import time
from typing import Callable, Dict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from convneur_mm.models.layers.neural_memory import NeuralMemory  # noqa: E402
from convneur_mm.utils.bench_env import (peak_gemm_rate, setup_benchmark_device,  # noqa: E402
                                         synchronize)
from tests.test_models.test_layers.memory_reference import reference_memory  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--tokens', type=int, default=56 * 56)
    parser.add_argument('--dim', type=int, default=128)
    parser.add_argument('--chunk', type=int, default=196)
    parser.add_argument('--update', choices=['parallel', 'sequential'], default='parallel')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=7)
    return parser.parse_args()


GEMM_OPS = ('aten::mm', 'aten::bmm', 'aten::addmm', 'aten::baddbmm', 'aten::addbmm')


def gemm_flops(step: Callable[[], None]) -> int:
    """FLOPs of the matrix products (and convolutions) one call of ``step`` runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def gemm_seconds(step: Callable[[], None], device: str) -> float:
    """Seconds one call of ``step`` spends inside matrix-product kernels."""
    activities = [ProfilerActivity.CPU]
    if device.startswith('cuda'):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
    attr = 'self_device_time_total' if device.startswith('cuda') else 'self_cpu_time_total'
    return sum(getattr(e, attr) for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6


def _step(memory: NeuralMemory, fn: Callable, x: torch.Tensor, device: str) -> None:
    memory.zero_grad(set_to_none=True)
    fn(memory, x).square().mean().backward()
    synchronize(device)


def time_paths(paths: Dict[str, Callable], memory: NeuralMemory, x: torch.Tensor,
               repeats: int, device: str) -> Dict[str, float]:
    """Median seconds of forward + backward per path.

    The paths take turns, so that a drift in the machine's load (a shared
    VM's neighbours) slows both alike instead of skewing their ratio.
    """
    times = {name: [] for name in paths}
    for name, fn in paths.items():
        _step(memory, fn, x, device)  # warm-up
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            _step(memory, fn, x, device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main():
    args = parse_args()
    device = setup_benchmark_device(args.device)
    torch.manual_seed(0)
    memory = NeuralMemory(args.dim, chunk_size=args.chunk, update=args.update).to(args.device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=args.device, requires_grad=True)
    paths = {'fast': lambda m, t: m(t), 'reference': reference_memory}
    median = time_paths(paths, memory, x, args.repeats, args.device)
    fast, slow = median['fast'], median['reference']
    flops = {name: gemm_flops(lambda: _step(memory, fn, x, args.device))
             for name, fn in paths.items()}
    fast_gemm = min(gemm_seconds(lambda: _step(memory, paths['fast'], x, args.device),
                                 args.device) for _ in range(3))
    best_rate = peak_gemm_rate(args.device)
    print(f'memory branch fwd+bwd, batch {args.batch}, {args.tokens} tokens, '
          f'C_m {args.dim}, chunk {args.chunk}, {args.update} update, on {device}')
    print(f'median of {args.repeats} interleaved runs per path')
    print('| path | time (ms) | GEMM GFLOP (fwd+bwd) |\n|---|---|---|')
    print(f'| fast (closed-form, scan) | {fast * 1e3:.1f} | {flops["fast"] / 1e9:.1f} |')
    print(f'| autograd reference | {slow * 1e3:.1f} | {flops["reference"] / 1e9:.1f} |')
    print(f'speed-up: {slow / fast:.2f}x')
    print(f'fast path in matrix products: {fast_gemm * 1e3:.1f} ms '
          f'({fast_gemm / fast:.0%} of its time, profiled, best of 3)')
    print(f'speed-up bound at these GEMMs and this GEMM rate (reference time / fast '
          f'path GEMM time): {slow / fast_gemm:.2f}x')
    floor = flops['fast'] / best_rate
    print(f'at the device\'s best GEMM rate ({best_rate / 1e9:.0f} GFLOP/s, a 2048^3 '
          f'product) these GEMMs take at least {floor * 1e3:.1f} ms: bound '
          f'{slow / floor:.2f}x')


if __name__ == '__main__':
    main()
