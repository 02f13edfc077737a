"""ATen ops that one global branch dispatches in eager mode: the kernels a
GPU launches for it.

    python tools/analysis_tools/count_ops.py [--arch m3] [--stage 0] [--size 224]
        [--batch 1] [--device cpu|meta] [--matmul-dtype D] [--kernels K]
        [--part branch|backbone|local-only] [--before PATH]

Counts, on the CPU, with a ``TorchDispatchMode`` (``AtenOpCounter`` of
``convneur_mm.testing.dispatch_probes``), the ops that the first global
branch of stage ``--stage`` dispatches in one forward pass at ``--size``
(stage 0 of M3 at 224x224: 3136 tokens, 16 chunks, 15 writes), without and
with autograd. Ops that return no tensor are left out, and views (which
launch nothing) are counted apart. Each kernel's tensor arguments and results
are also summed in bytes, as if each were read or written once: the least
memory traffic of the unfused ops, which bounds their time by the device's
bandwidth; and the most bytes of tensors the branch holds at once in
inference (``LiveTensorBytes``), its working set beyond the input.
``--device meta`` runs on tensors without data, so that a training-sized batch
(128) counts in seconds; it dispatches as a CPU does (on CUDA, inference
products write float32 directly instead of a widening cast). With ``--kernels
triton`` on ``meta`` the fused kernels' wrappers allocate what they would on a
GPU and their launches do nothing: the inference count of CUDA's fused path
(the kernels are forward-only: no autograd count; their own traffic is not in
the bytes moved). ``--matmul-dtype`` and
``--kernels`` set the memory's ``memory_cfg``.
``--before PATH`` counts the same branch
of the package at PATH (e.g. ``git worktree add /tmp/before <commit>``) in a
child process that imports it (PATH first on its ``PYTHONPATH``), with this
tree's counter, and prints the reduction.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, Iterator, List, Optional
from unittest import mock

import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='m3')
    parser.add_argument('--stage', type=int, default=0)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--device', choices=('cpu', 'meta'), default='cpu',
                        help="'meta': shapes and dtypes only, no data (any batch, in seconds)")
    parser.add_argument('--matmul-dtype', choices=('auto', 'float32', 'bfloat16', 'float16'),
                        default='auto', help="memory_cfg.matmul_dtype")
    parser.add_argument('--kernels', choices=('auto', 'torch', 'triton'), default='auto',
                        help="memory_cfg.kernels ('triton' on meta: launches left out)")
    parser.add_argument('--part', choices=('branch', 'backbone', 'local-only'),
                        default='branch', help="the stage's first global branch, the whole "
                        "backbone, or the backbone without global branches")
    parser.add_argument('--top', type=int, default=8,
                        help='ops listed by their bytes (this tree)')
    parser.add_argument('--before', help='a checkout of the package to count too')
    parser.add_argument('--json', action='store_true', help='print the counts as JSON')
    return parser.parse_args(argv)


def _probes():
    """``dispatch_probes`` from this tree, loaded by path (it needs torch
    only), so that a child counting another checkout uses the same probes."""
    path = osp.join(ROOT, 'convneur_mm', 'testing', 'dispatch_probes.py')
    spec = importlib.util.spec_from_file_location('_dispatch_probes', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _kernels_without_launches() -> Iterator[None]:
    """The fused kernels on meta tensors: their wrappers check and allocate
    as on a GPU, the launches do nothing."""
    from convneur_mm.models.layers.memory_kernels import ops
    from convneur_mm.models.layers.neural_memory import NeuralMemory

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    class Kernels:  # kernels.<name>[grid](...) does nothing
        def __getattr__(self, name):
            return NoLaunch()

    with mock.patch.object(ops, '_launch_config', lambda dtype, device: (Kernels(), dict(
            DTYPE=None, PREC='ieee', BASE_PREC='ieee'))), \
            mock.patch.object(ops, '_check_runnable', lambda *args: None), \
            mock.patch.object(NeuralMemory, '_kernels_unavailable', lambda self, x, dtype: None):
        yield


def count(arch: str, stage: int, size: int, batch: int, device: str = 'cpu',
          memory_cfg: Optional[Dict] = None, part: str = 'branch') -> dict:
    """Kernels, views and bytes of the stage's first global branch, or of the
    whole backbone (``part``; 'local-only': without global branches), in
    the package this process imports; ``memory_cfg`` overrides the memory's."""
    from convneur_mm.models import ConvNeur
    probes = _probes()
    memory_cfg = memory_cfg or {}
    stubbed = device == 'meta' and memory_cfg.get('kernels') == 'triton'
    torch.manual_seed(0)
    options = dict(memory_placement='none') if part == 'local-only' else {}
    if memory_cfg:
        options['memory_cfg'] = memory_cfg
    model = ConvNeur(arch=arch, **options).eval().to(device)
    if part == 'branch':
        block = next(b for b in model.stages[stage] if b.global_branch is not None)
        channels = block.local_branch.dwconv.in_channels
        side = size // 4 // 2**stage
        module, x = block.global_branch, torch.randn(batch, channels, side, side, device=device)
    else:
        module, x = model, torch.randn(batch, 3, size, size, device=device)
    result = {}
    for grad in (False, ) if stubbed else (False, True):
        with torch.set_grad_enabled(grad), probes.AtenOpCounter() as counter, \
                probes.LiveTensorBytes() as live, \
                _kernels_without_launches() if stubbed else contextlib.nullcontext():
            module(x)
        result['autograd' if grad else 'inference'] = dict(
            kernels=counter.num_kernels, views=counter.num_views,
            by_op=dict(counter.kernels.most_common()), peak_live_bytes=live.peak,
            bytes=counter.total_bytes, bytes_by_op=dict(counter.bytes.most_common()))
    return result


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    memory_cfg = {key: value for key, value in (('matmul_dtype', args.matmul_dtype),
                                                ('kernels', args.kernels)) if value != 'auto'}
    here = count(args.arch, args.stage, args.size, args.batch, args.device, memory_cfg,
                 args.part)
    if args.json:
        print(json.dumps(here))
        return here
    counts = {'this tree': here}
    if args.before:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [osp.abspath(args.before)] +
            [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
        child = subprocess.run(
            [sys.executable, osp.abspath(__file__), '--arch', args.arch,
             '--stage', str(args.stage), '--size', str(args.size),
             '--batch', str(args.batch), '--device', args.device,
             '--matmul-dtype', args.matmul_dtype, '--kernels', args.kernels,
             '--part', args.part, '--json'],
            check=True, capture_output=True, text=True, env=env)
        counts = {f'before ({args.before})': json.loads(child.stdout.splitlines()[-1]),
                  **counts}
    what = {'branch': f'the first global branch of stage {args.stage}',
            'backbone': 'the backbone', 'local-only': 'the local-only backbone'}[args.part]
    print(f'ATen ops of {what}, ConvNeur-{args.arch.upper()}, batch {args.batch} at '
          f'{args.size}x{args.size}, eager, {args.device}, torch {torch.__version__}')
    print('| code | inference: kernels | views | GB moved | MiB held at most | '
          'with autograd: kernels | views | GB moved |')
    print('|---|---|---|---|---|---|---|---|')
    for name, c in counts.items():
        inf = c['inference']
        grad = c.get('autograd')  # none for the stubbed fused kernels
        autograd = (f'{grad["kernels"]} | {grad["views"]} | {grad["bytes"] / 1e9:.3g}'
                    if grad else '- | - | -')
        print(f'| {name} | {inf["kernels"]} | {inf["views"]} | {inf["bytes"] / 1e9:.3g} | '
              f'{inf["peak_live_bytes"] / 2**20:.1f} | {autograd} |')
    print(f'\nThis tree, inference: the {args.top} ops that move the most bytes')
    print('| op | calls | GB moved | share |')
    print('|---|---|---|---|')
    inference = here['inference']
    for op, nbytes in list(inference['bytes_by_op'].items())[:args.top]:
        print(f'| {op} | {inference["by_op"][op]} | {nbytes / 1e9:.3g} | '
              f'{nbytes / max(inference["bytes"], 1):.0%} |')
    if args.before:
        old, new = counts[f'before ({args.before})'], here
        for mode in here:  # no autograd count for the stubbed fused kernels
            cut = 1 - new[mode]['kernels'] / old[mode]['kernels']
            print(f'{mode}: {cut:.0%} fewer kernels (target >= 30%)')
    return counts


if __name__ == '__main__':
    main()
