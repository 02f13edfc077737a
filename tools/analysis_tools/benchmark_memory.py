"""Forward+backward time of one memory branch: fast path vs autograd reference.

    python tools/analysis_tools/benchmark_memory.py [--device cpu] [--update parallel]

Default size: ConvNeur-M3 stage 1 at 224x224 (batch 8, 56x56 tokens, C_m 128,
chunk 196). The reference is the plain per-chunk loop with
``torch.autograd.grad(create_graph=True)`` that the tests check the fast path
against; both are timed in the same process, taking turns, and the ratio is
printed. CPU runs use the malloc tuning of ``convneur_mm.utils.cpu_malloc``
(``CONVNEUR_MALLOC_TUNING=0`` times glibc's defaults).
"""
import argparse
import os.path as osp
import sys
import time
from typing import Callable, Dict

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from convneur_mm.models.layers.neural_memory import NeuralMemory  # noqa: E402
from convneur_mm.utils.bench_env import setup_benchmark_device  # noqa: E402
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


def time_paths(paths: Dict[str, Callable], memory: NeuralMemory, x: torch.Tensor,
               repeats: int, device: str) -> Dict[str, float]:
    """Median seconds of forward + backward per path.

    The paths take turns, so that a drift in the machine's load (a shared
    VM's neighbours) slows both alike instead of skewing their ratio.
    """
    def step(fn):
        memory.zero_grad(set_to_none=True)
        fn(memory, x).square().mean().backward()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
    times = {name: [] for name in paths}
    for name, fn in paths.items():
        step(fn)  # warm-up
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            step(fn)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main():
    args = parse_args()
    device = setup_benchmark_device(args.device)
    torch.manual_seed(0)
    memory = NeuralMemory(args.dim, chunk_size=args.chunk, update=args.update).to(args.device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=args.device, requires_grad=True)
    median = time_paths({'fast': lambda m, t: m(t), 'reference': reference_memory},
                        memory, x, args.repeats, args.device)
    fast, slow = median['fast'], median['reference']
    print(f'memory branch fwd+bwd, batch {args.batch}, {args.tokens} tokens, '
          f'C_m {args.dim}, chunk {args.chunk}, {args.update} update, on {device}')
    print(f'median of {args.repeats} interleaved runs per path')
    print('| path | time (ms) |\n|---|---|')
    print(f'| fast (closed-form, scan) | {fast * 1e3:.1f} |')
    print(f'| autograd reference | {slow * 1e3:.1f} |')
    print(f'speed-up: {slow / fast:.2f}x')


if __name__ == '__main__':
    main()
