"""Forward+backward time of one memory branch: our closed-form path vs the
autograd reference and titans-pytorch's NeuralMemory; or, with ``--model``,
a whole backbone's inference memory and throughput on the CPU.

    python tools/analysis_tools/benchmark_memory.py [--device cpu] [--update parallel]
        [--compile] [--repeats 7]
    python tools/analysis_tools/benchmark_memory.py --model m3 --batch 16
        [--working-set-mib 64] [--before PATH] [--rounds 3] [--repeats 3]

``--model ARCH`` (float32, CPU): the peak resident-set growth of one
inference forward pass (``bench_env.PeakMemoryGrowth``, after a warm-up
pass) of the arch's local-only network, of the arch, and of the arch with
``memory_cfg.working_set_mib`` (image slices); then its throughput
(``bench_env.RegionTimer``), against the package of the checkout at
``--before`` if given (e.g. ``git worktree add /tmp/before <commit>``): each
measurement runs in a fresh process and the two codes take turns, round by
round, so that a drift of a shared machine's load slows both alike.

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
import functools
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
from convneur_mm.analysis.bench_env import (PeakMemoryGrowth, RegionTimer,  # noqa: E402
                                            median, peak_gemm_rate, setup_benchmark_device,
                                            synchronize, time_in_turns)
from convneur_mm.utils.cli import positive_int  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', metavar='ARCH',
                        help='whole-model mode: inference peak memory growth and throughput '
                        'of this arch (e.g. m3) against its local-only network (see above)')
    parser.add_argument('--size', type=positive_int, default=224)
    parser.add_argument('--working-set-mib', type=positive_int, default=64,
                        help='--model: the sliced variant\'s memory_cfg working_set_mib')
    parser.add_argument('--before', metavar='PATH',
                        help='--model: also time the package of the checkout at PATH')
    parser.add_argument('--rounds', type=positive_int, default=3,
                        help='--model: interleaved rounds of timing processes')
    parser.add_argument('--model-child', help=argparse.SUPPRESS)
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
    from convneur_mm.analysis.op_profile import MATRIX_PRODUCTS, profile_call
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
    calls = {name: functools.partial(step, module, fn, x, device)
             for name, (module, fn) in paths.items()}
    # one untimed turn first: warm-up (and compilation)
    times = time_in_turns(calls, repeats, device, warmup=1)
    return {name: median(t) for name, t in times.items()}


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


def model_child(spec: dict) -> dict:
    """One measurement of a whole backbone in inference, in this process
    (the package of ``spec['root']``): ``peak`` (MiB of resident-set growth
    over a forward pass after a warm-up one) or ``time`` (seconds of each of
    ``repeats`` forward passes)."""
    from convneur_mm.models import ConvNeur
    setup_benchmark_device('cpu')
    kwargs = dict(arch=spec['arch'])
    if spec['variant'] == 'local-only':
        kwargs['memory_placement'] = 'none'
    if spec.get('working_set_mib'):
        kwargs['memory_cfg'] = dict(working_set_mib=spec['working_set_mib'])
    torch.manual_seed(0)
    model = ConvNeur(**kwargs).eval()
    x = torch.randn(spec['batch'], 3, spec['size'], spec['size'])
    with torch.no_grad():
        model(x)  # warm-up
        if spec['measure'] == 'peak':
            window = PeakMemoryGrowth('cpu')
            model(x)
            return dict(mib=window.mib())
        times = []
        for _ in range(spec['repeats']):
            timer = RegionTimer('cpu')
            timer.start('forward')
            model(x)
            timer.stop('forward')
            times.append(timer.seconds())
    return dict(seconds=times)


def _run_child(spec: dict) -> dict:
    """``model_child(spec)`` in a fresh process that imports the package of
    ``spec['root']``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [spec['root']] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    out = subprocess.run([sys.executable, osp.abspath(__file__), '--model-child',
                          json.dumps(spec)], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.splitlines()[-1])


def model_report(args: argparse.Namespace) -> dict:
    """Whole-model figures, each measurement in a fresh process (its own
    allocator and peak): peak growth of local-only, of the model and of the
    model with ``working_set_mib``; then throughput of this tree's model,
    sliced and not, against ``--before``'s, the processes taking turns round
    by round."""
    base = dict(arch=args.model, batch=args.batch, size=args.size, root=ROOT)
    variants = {'local-only': dict(variant='local-only'),
                args.model: dict(variant='model'),
                f'{args.model}, working_set_mib {args.working_set_mib}':
                    dict(variant='model', working_set_mib=args.working_set_mib)}
    if args.before:
        variants[f'{args.model}, before ({args.before})'] = dict(
            variant='model', root=osp.abspath(args.before))
    peaks = {name: _run_child(dict(base, **v, measure='peak'))['mib']
             for name, v in variants.items()}
    sliced = f'{args.model}, working_set_mib {args.working_set_mib}'
    timed = {args.model: dict(base, variant='model'),
             sliced: dict(base, variant='model', working_set_mib=args.working_set_mib)}
    if args.before:
        timed[f'{args.model}, before'] = dict(base, variant='model',
                                              root=osp.abspath(args.before))
    seconds = {name: [] for name in timed}
    for _ in range(args.rounds):
        for name, spec in timed.items():
            seconds[name] += _run_child(dict(spec, measure='time',
                                             repeats=args.repeats))['seconds']
    medians = {name: sorted(t)[len(t) // 2] for name, t in seconds.items()}
    print(f'ConvNeur-{args.model.upper()} inference, batch {args.batch} at '
          f'{args.size}x{args.size}, float32, on {setup_benchmark_device("cpu")}, '
          f'torch {torch.__version__}')
    print('| variant | peak memory growth (MiB) | / local-only |')
    print('|---|---|---|')
    for name, mib in peaks.items():
        print(f'| {name} | {mib:.0f} | {mib / peaks["local-only"]:.2f}x |')
    print(f'\nthroughput: median of {args.rounds} interleaved rounds x {args.repeats} '
          'forward passes, one process per round and variant')
    print('| code | s / batch | img/s |')
    print('|---|---|---|')
    for name, sec in medians.items():
        print(f'| {name} | {sec:.3f} | {args.batch / sec:.1f} |')
    if args.before:
        print(f'this tree / before: {medians[f"{args.model}, before"] / medians[args.model]:.3f}x '
              'the throughput')
    return dict(peaks=peaks, seconds=seconds)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.model_child:
        print(json.dumps(model_child(json.loads(args.model_child))))
        return
    if args.model:
        model_report(args)
        return
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    device = setup_benchmark_device(args.device)
    torch.manual_seed(0)
    memory = NeuralMemory(args.dim, chunk_size=args.chunk, update=args.update).to(args.device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=args.device, requires_grad=True)
    from convneur_mm.testing.memory_reference import reference_memory
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
