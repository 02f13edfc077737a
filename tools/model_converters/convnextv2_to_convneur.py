"""Turn a published ConvNeXt-V2 checkpoint into ConvNeur weights.

    python tools/model_converters/convnextv2_to_convneur.py SRC DST [--arch m3] [--task dense|cls]
    CONVNEUR_PRETRAINED=DST tools/dist_train.sh configs/convnextv2/cascade_rcnn_convneur_m3_convnextv2_1x_coco.py 4

SRC is a ConvNeXt-V2 atto, femto, pico or nano checkpoint in the official,
MMPretrain or timm layout (found by its keys; ``.safetensors`` too), read by
the weights-only loader. Its local network becomes ConvNeur M1..M4's; the
global branches, which it has no counterpart for, are written at ConvNeur's
own initialization and named. ``--task dense`` (default) writes the backbone
with the four output norms of the detection and segmentation configs;
``--task cls`` the MMPretrain classifier, head included. Load it with
``global_init='warm'`` to start from ConvNeXt-V2's function
(docs/user_guides/warm_start.md). The mapping is
``convneur_mm.models.converters.convnextv2.KEY_TABLE``; this tool builds the
target ConvNeur and the conversion fills its state dict.
"""
import argparse
import os
import os.path as osp
from typing import Optional, Sequence

import torch
from mmengine.runner.checkpoint import _load_checkpoint

import convneur_mm  # noqa: F401  (the weights-only loader)
from convneur_mm.apis.toolbox import quiet_init
from convneur_mm.models import ConvNeur
from convneur_mm.models.converters.convnextv2 import (TASKS, ConvNeXtV2CheckpointError,
                                                      backbone_cfg, convert, source_arch)
from convneur_mm.utils.checkpoint_safety import file_sha256


def read_checkpoint(src: str) -> dict:
    """The checkpoint at ``src``: safetensors (timm's hub files) or a torch
    file through MMEngine's loader, which ``convneur_mm`` makes weights-only."""
    if not osp.isfile(src):
        raise FileNotFoundError(f'{src} not found')
    if src.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConvNeXtV2CheckpointError(
                f'{src} is a safetensors file: pip install safetensors') from None
        return load_file(src)
    try:
        return _load_checkpoint(src, map_location='cpu')
    except Exception as err:  # not a torch file, or refused by the weights-only loader
        first = str(err).splitlines()[0] if str(err) else ''
        raise ConvNeXtV2CheckpointError(
            f'{src} cannot be read as a checkpoint ({type(err).__name__}: {first})') from None


def initialized_target(cfg: dict, seed: int = 0) -> dict:
    """The state dict of ``ConvNeur(**cfg)`` after its own init, seeded
    without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]), quiet_init():  # not a line per parameter
        torch.manual_seed(seed)
        model = ConvNeur(**cfg)
        model.init_weights()
    return model.state_dict()


def convert_file(src: str, dst: str, task: str = 'dense', arch: Optional[str] = None,
                 memory_placement: str = 'stage', seed: int = 0) -> dict:
    """Convert the file ``src``, save the result to ``dst``; returns its meta.

    Args:
        src: the ConvNeXt-V2 checkpoint.
        dst: where to write the ConvNeur checkpoint.
        task: 'dense' or 'cls' (see ``backbone_cfg``).
        arch: the expected ConvNeur arch (default: the one the shapes give).
        memory_placement: the target's.
        seed: the seed of the initialization written for the global branches.
    """
    checkpoint, source = read_checkpoint(src), osp.basename(src)
    cfg = backbone_cfg(source_arch(checkpoint, arch, source), task, memory_placement)
    converted = convert(checkpoint, initialized_target(cfg, seed), cfg, task, source,
                        initialization=f'ConvNeur.init_weights() with seed {seed} '
                        "(the paper's init)")
    converted['meta']['source_sha256'] = file_sha256(src)
    if osp.dirname(dst):
        os.makedirs(osp.dirname(dst), exist_ok=True)
    torch.save(converted, dst)
    return converted['meta']


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='ConvNeXt-V2 checkpoint (official, mmpretrain or timm)')
    parser.add_argument('dst', help='where to write the ConvNeur checkpoint')
    parser.add_argument('--arch', choices=['m1', 'm2', 'm3', 'm4'],
                        help='expected ConvNeur arch (default: inferred from the shapes)')
    parser.add_argument('--task', choices=TASKS, default='dense',
                        help="dense: backbone.* for the detection/segmentation configs; "
                        "cls: the MMPretrain classifier with its head (default: dense)")
    parser.add_argument('--memory-placement', choices=['stage', 'block', 'none'],
                        default='stage', help="the target's memory_placement (default: stage)")
    args = parser.parse_args(argv)
    try:
        meta = convert_file(args.src, args.dst, args.task, args.arch, args.memory_placement)
    except (ConvNeXtV2CheckpointError, FileNotFoundError) as err:
        raise SystemExit(f'error: {err}')
    backbone = meta['backbone']
    print(f'{args.src} ({meta["source_model"]}, {meta["source_format"]} format) -> {args.dst}')
    print(f'  ConvNeur-{backbone["arch"].upper()}, memory placement '
          f'{backbone["memory_placement"]}, task {meta["task"]}: copied '
          f'{meta["copied_keys"]} tensors')
    if meta['task'] == 'cls' and not meta['head_keys']:
        print(f'  note: {args.src} holds no head: a config that loads the head from it '
              '(configs/convnextv2/cls_*) needs --cfg-options model.head.init_cfg=None')
    if meta['left_at_init']:
        print(f'  left at their initialization ({meta["initialization"]}), '
              f'{len(meta["left_at_init"])} global branches: ' + ', '.join(meta['left_at_init']))
    other = [k for k in meta['initialized_keys'] if '.global_branch.' not in k]
    if other:
        print('  also at their initialization: ' + ', '.join(other))
    if meta['dropped_keys']:
        print('  dropped: ' + ', '.join(meta['dropped_keys']))
    print(f'Load it with CONVNEUR_PRETRAINED={args.dst} (or --cfg-options '
          f'model.backbone.init_cfg.checkpoint={args.dst}) and model.backbone.global_init=warm')


if __name__ == '__main__':
    main()
