"""How many graphs ``--compile`` compiles while a model evaluates images of
varying sizes, the way tools/test.py feeds them.

    python tools/analysis_tools/count_compilations.py CONFIG [--images 24]
        [--long-side 640] [--seed 0] [--backend eager|inductor] [--static]

Draws ``--images`` image sizes whose long side is ``--long-side`` (COCO's
images are 640 long) and whose short side is uniform in [half, all] of it,
landscape or portrait; resizes each as the config's test pipeline does (its
keep-ratio ``Resize``), preprocesses a random image of that size as the model
does in evaluation (mmdet pads to a multiple of 32, mmseg does not pad), and
runs the model's network (``mode='tensor'``; for a detector its backbone and
neck) without gradients, its parts compiled as ``--compile`` compiles them.
Prints each input shape with the graphs compiled so far, and in the end the
distinct shapes and the graphs.

In evaluation ``--compile`` uses automatic dynamic shapes (a part's second
shape compiles a graph with symbolic sizes that later shapes reuse);
``--static`` compiles evaluation with static shapes instead, as training is:
one graph per shape and part, up to ``torch._dynamo.config.recompile_limit``
(8), after which a part runs eager. The default backend, ``eager``, is
Dynamo's tracing without code generation: the graphs and their guards are
Dynamo's, it takes seconds a graph instead of minutes on a CPU;
``--backend inductor`` generates the code too.
"""
import argparse
import os.path as osp
import random
import sys
from typing import List, Tuple

import torch

from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model, dummy_batch, tensor_forward
from convneur_mm.engine.compile import compile_model, find_resize_scale, graphs_compiled


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--images', type=int, default=24)
    parser.add_argument('--long-side', type=int, default=640)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--backend', default='eager', choices=('eager', 'inductor'))
    parser.add_argument('--static', action='store_true',
                        help='static shapes in evaluation too (as in training)')
    args = parser.parse_args(argv)
    if args.images < 1 or args.long_side < 2:
        parser.error('--images must be >= 1 and --long-side >= 2')
    return args


def image_sizes(count: int, long_side: int, seed: int) -> List[Tuple[int, int]]:
    """``count`` (H, W): long side ``long_side``, short side uniform in
    [long_side / 2, long_side], landscape or portrait with equal odds."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        short = rng.randint((long_side + 1) // 2, long_side)
        sizes.append((short, long_side) if rng.random() < 0.5 else (long_side, short))
    return sizes


def resized(size: Tuple[int, int], scale: Tuple[int, int]) -> Tuple[int, int]:
    """(H, W) after the test pipeline's keep-ratio resize to ``scale``."""
    from mmcv import rescale_size
    w, h = rescale_size(size[::-1], scale)
    return h, w


def compiled_network(model: torch.nn.Module, batch: dict):
    """The network as far as ``--compile`` compiles it: all of it
    (``mode='tensor'``), but for a detector's RPN and RoI heads, which run
    eager and would only add their time (a thousand proposals' RoIAlign)."""
    if hasattr(model, 'rpn_head') or hasattr(model, 'roi_head'):
        return model.extract_feat(batch['inputs'])
    return tensor_forward(model, batch)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config)
    scale = find_resize_scale(cfg.get('test_dataloader', {}).get('dataset'))
    if scale is None:
        raise SystemExit(f'{args.config}: its test pipeline has no keep-ratio Resize')
    torch.manual_seed(0)
    torch._dynamo.reset()  # a count from nothing: no graph or size seen before
    model = build_model(cfg).eval()
    names = compile_model(model, backend=args.backend,
                          inference_dynamic=False if args.static else None)
    print(f'{osp.basename(args.config)}: {", ".join(names)} compiled (backend '
          f'{args.backend}, evaluation {"static" if args.static else "automatic dynamic"} '
          f'shapes); test resize to {scale}')
    shapes, before = set(), graphs_compiled()
    for size in image_sizes(args.images, args.long_side, args.seed):
        batch = dummy_batch(model, cfg.default_scope, resized(size, scale))
        with torch.no_grad():
            compiled_network(model, batch)
        shape = tuple(batch['inputs'].shape[-2:])
        shapes.add(shape)
        print(f'image {size[0]}x{size[1]} -> input {shape[0]}x{shape[1]}: '
              f'{graphs_compiled() - before} graph(s) so far', flush=True)
    print(f'{args.images} images, {len(shapes)} distinct input shapes, '
          f'{graphs_compiled() - before} graph(s) compiled for {len(names)} part(s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
