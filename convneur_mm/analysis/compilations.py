"""How many graphs ``--compile`` compiles while a model evaluates images of
varying sizes, the way tools/test.py feeds them.

``count_compilations`` draws image sizes whose long side is ``long_side``
(COCO's images are 640 long) and whose short side is uniform in [half, all]
of it, landscape or portrait; resizes each as the config's test pipeline does
(its keep-ratio ``Resize``), preprocesses a random image of that size as the
model does in evaluation (mmdet pads to a multiple of 32, mmseg does not), and
runs the model's network (``mode='tensor'``; for a detector its backbone and
neck) without gradients, its parts compiled as ``--compile`` compiles them.

In evaluation ``--compile`` uses automatic dynamic shapes (a part's second
shape compiles a graph with symbolic sizes that later shapes reuse);
``static=True`` compiles evaluation with static shapes instead, as training
is: one graph per shape and part, up to Dynamo's recompile limit, after which
a part runs eager. Backend ``eager`` is Dynamo's tracing without code
generation (seconds a graph instead of minutes on a CPU); ``inductor``
generates the code too.
"""
import os.path as osp
import random
from typing import Callable, List, Tuple

import torch

BACKENDS = ('eager', 'inductor')


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
    from convneur_mm.apis.toolbox import tensor_forward
    if hasattr(model, 'rpn_head') or hasattr(model, 'roi_head'):
        return model.extract_feat(batch['inputs'])
    return tensor_forward(model, batch)


def count_compilations(config: str, images: int = 24, long_side: int = 640, seed: int = 0,
                       backend: str = 'eager', static: bool = False,
                       log: Callable[[str], None] = print) -> dict:
    """The graphs compiled while the config's model evaluates ``images`` sizes.

    Args:
        config: a config file (path, or name of a shipped config).
        images: how many image sizes to draw.
        long_side: their long side.
        seed: the draw's seed.
        backend: ``'eager'`` (Dynamo's tracing only) or ``'inductor'``.
        static: static shapes in evaluation too (as in training).
        log: called with a line per image (graphs so far) and a heading.

    Returns:
        ``images``, ``shapes`` (distinct input shapes), ``graphs``, ``parts``
        (the compiled parts' names) and ``per_image`` (size, input, graphs so far).
    """
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model, dummy_batch
    from convneur_mm.engine.compile import compile_model, find_resize_scale, graphs_compiled
    if images < 1 or long_side < 2:
        raise ValueError(f'images must be >= 1 and long_side >= 2, got {images}, {long_side}')
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    cfg = load_config(config)
    scale = find_resize_scale(cfg.get('test_dataloader', {}).get('dataset'))
    if scale is None:
        raise ValueError(f'{config}: its test pipeline has no keep-ratio Resize')
    torch.manual_seed(0)
    torch._dynamo.reset()  # a count from nothing: no graph or size seen before
    model = build_model(cfg).eval()
    names = compile_model(model, backend=backend, inference_dynamic=False if static else None)
    log(f'{osp.basename(config)}: {", ".join(names)} compiled (backend {backend}, evaluation '
        f'{"static" if static else "automatic dynamic"} shapes); test resize to {scale}')
    shapes, before, per_image = set(), graphs_compiled(), []
    for size in image_sizes(images, long_side, seed):
        batch = dummy_batch(model, cfg.default_scope, resized(size, scale))
        with torch.no_grad():
            compiled_network(model, batch)
        shape = tuple(batch['inputs'].shape[-2:])
        shapes.add(shape)
        per_image.append(dict(size=size, input=shape, graphs=graphs_compiled() - before))
        log(f'image {size[0]}x{size[1]} -> input {shape[0]}x{shape[1]}: '
            f'{per_image[-1]["graphs"]} graph(s) so far')
    return dict(images=images, shapes=len(shapes), graphs=graphs_compiled() - before,
                parts=list(names), per_image=per_image)


def format_compilations(result: dict) -> str:
    """The summary line of a ``count_compilations`` result."""
    return (f'{result["images"]} images, {result["shapes"]} distinct input shapes, '
            f'{result["graphs"]} graph(s) compiled for {len(result["parts"])} part(s)')
