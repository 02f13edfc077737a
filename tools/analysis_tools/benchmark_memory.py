"""Forward+backward time of one memory branch: fast path vs autograd reference.

    python tools/analysis_tools/benchmark_memory.py [--device cpu] [--update parallel]

Default size: ConvNeur-M3 stage 1 at 224x224 (batch 8, 56x56 tokens, C_m 128,
chunk 196). The reference is the plain per-chunk loop with
``torch.autograd.grad(create_graph=True)`` that the tests check the fast path
against; both are timed in the same process and the ratio is printed.
"""
import argparse
import os.path as osp
import platform
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from convneur_mm.models.layers.neural_memory import NeuralMemory  # noqa: E402
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
    parser.add_argument('--repeats', type=int, default=5)
    return parser.parse_args()


def time_step(fn, memory, x, repeats, device) -> float:
    """Median seconds of forward + backward."""
    def step():
        memory.zero_grad(set_to_none=True)
        fn(memory, x).square().mean().backward()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    args = parse_args()
    torch.manual_seed(0)
    memory = NeuralMemory(args.dim, chunk_size=args.chunk, update=args.update).to(args.device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=args.device, requires_grad=True)
    fast = time_step(lambda m, t: m(t), memory, x, args.repeats, args.device)
    slow = time_step(reference_memory, memory, x, args.repeats, args.device)
    device = (torch.cuda.get_device_name() if args.device.startswith('cuda')
              else f'{platform.processor() or platform.machine()}, '
                   f'{torch.get_num_threads()} threads')
    print(f'memory branch fwd+bwd, batch {args.batch}, {args.tokens} tokens, '
          f'C_m {args.dim}, chunk {args.chunk}, {args.update} update, on {device}')
    print('| path | time (ms) |\n|---|---|')
    print(f'| fast (closed-form, scan) | {fast * 1e3:.1f} |')
    print(f'| autograd reference | {slow * 1e3:.1f} |')
    print(f'speed-up: {slow / fast:.2f}x')


if __name__ == '__main__':
    main()
