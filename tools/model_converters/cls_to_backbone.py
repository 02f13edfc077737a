"""Turn a ConvNeur ImageNet classification checkpoint into backbone weights that
the detection and segmentation configs load strictly.

    python tools/model_converters/cls_to_backbone.py CLS_CHECKPOINT OUT.pth
    CONVNEUR_PRETRAINED=OUT.pth tools/dist_train.sh configs/cascade_rcnn_convneur_m3_1x_coco.py 4

What the conversion does, and why:

* ``backbone.*`` tensors are copied unchanged and keep their prefix, which
  the dense configs strip with ``init_cfg=dict(type='Pretrained',
  prefix='backbone.')``. The classifier head, the data preprocessor and the
  optimizer, scheduler and message-hub states are dropped.
* Output norms: a classifier has only ``norm3`` (a LayerNorm after global
  pooling); the dense backbones normalize every stage's map with
  ``norm0``..``norm3``. ``norm3`` is kept (the same per-channel affine
  LayerNorm, now on the map, as with ConvNeXt). ``norm0``..``norm2`` have no
  pretrained value, so they are written at exactly the initialization
  ``ConvNeur`` gives them (weight 1, bias 0) and listed in
  ``meta['initialized_keys']``: the strict loader then sees zero missing and
  zero unexpected keys, and every key's origin is on record, instead of the
  loader having to tolerate missing keys (which would hide real mismatches).
* The memory settings (chunk size, inner step) differ between tasks but are
  not weights, so nothing depends on them here.

The architecture (depths, widths, memory width, heads, placement, fusion) is
inferred from the tensor shapes and checked against a ``ConvNeur`` built
from it; any other input is refused with :class:`NotConvNeurClassifierError`.
"""
import argparse
import os
import os.path as osp
import re
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from mmengine.runner.checkpoint import _load_checkpoint

import convneur_mm
from convneur_mm.models.backbones.convneur import ConvNeur
from convneur_mm.models.utils.pretrained import (CheckpointMismatchError, compare_state_dicts,
                                          extract_state_dict)
from convneur_mm.utils.checkpoint_safety import file_sha256

PREFIX = 'backbone.'
CONVERTER = 'tools/model_converters/cls_to_backbone.py'
DENSE_OUT_INDICES = (0, 1, 2, 3)
# top-level modules of MMDetection / MMSegmentation models, never of a classifier
DENSE_MODULES = ('neck.', 'rpn_head.', 'roi_head.', 'bbox_head.', 'mask_head.',
                 'decode_head.', 'auxiliary_head.')
SOURCE_META_KEYS = ('epoch', 'iter', 'experiment_name', 'time', 'seed', 'mmengine_version')

Tensors = Dict[str, torch.Tensor]


class NotConvNeurClassifierError(ValueError):
    """The input is not a ConvNeur classification checkpoint."""


def _refuse(source: str, why: str) -> NotConvNeurClassifierError:
    return NotConvNeurClassifierError(
        f'{source} is not a ConvNeur classification checkpoint: {why}')


def _sample(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ', '.join(keys[:limit]) + (' ...' if len(keys) > limit else '')


def split_classifier(checkpoint: dict, source: str = 'the checkpoint') -> Tuple[Tensors, Tensors]:
    """The (backbone, everything else) tensors of an MMPretrain classifier
    checkpoint, backbone keys without their prefix; refuses anything else."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if isinstance(meta, dict) and meta.get('converter') == CONVERTER:
        raise _refuse(source, f'it is already the output of {CONVERTER}; give it to '
                      'the detection/segmentation config as it is')
    try:
        state = extract_state_dict(checkpoint)
    except CheckpointMismatchError as err:  # no state dict at all
        raise _refuse(source, str(err)) from None
    dense = sorted({k.split('.')[0] + '.' for k in state if k.startswith(DENSE_MODULES)})
    if dense:
        raise _refuse(source, f'it has {", ".join(dense)} weights of a detector or '
                      'segmentor, whose backbone.* keys already fit the dense configs '
                      "(init_cfg with prefix='backbone.', or load_from)")
    backbone = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    if not backbone:
        raise _refuse(source, f'no key starts with {PREFIX!r} (found e.g. {_sample(state)})')
    if not any(k.startswith('head.') for k in rest):
        raise _refuse(source, 'it has no classification head (head.*): only checkpoints '
                      'of an ImageClassifier are converted')
    if 'downsample_layers.0.0.weight' not in backbone or not any(
            k.startswith('stages.') for k in backbone):
        raise _refuse(source, 'its backbone is not a ConvNeur (no downsample_layers.0 / '
                      f'stages.* keys; found e.g. {_sample(backbone)})')
    return backbone, rest


def _blocks(state: Tensors) -> Dict[int, set]:
    """{stage: block indices} of ``stages.<stage>.<block>.*`` keys."""
    blocks: Dict[int, set] = {}
    for key in state:
        match = re.match(r'stages\.(\d+)\.(\d+)\.', key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    return blocks


def infer_backbone_cfg(state: Tensors) -> dict:
    """ConvNeur keyword arguments that reproduce the parameters of ``state``
    (backbone keys without prefix). 'gate' and 'add' fusion have the same
    parameters; the default 'gate' stands for both."""
    blocks = _blocks(state)
    num_stages = len(blocks)
    if sorted(blocks) != list(range(num_stages)) or any(
            sorted(b) != list(range(len(b))) for b in blocks.values()):
        raise NotConvNeurClassifierError(f'stages/blocks are not numbered 0..n: {blocks}')
    depths = [len(blocks[i]) for i in range(num_stages)]
    try:
        dims = [state['downsample_layers.0.0.weight'].shape[0]] + [
            state[f'downsample_layers.{i}.1.weight'].shape[0] for i in range(1, num_stages)]
    except KeyError as err:
        raise NotConvNeurClassifierError(f'missing downsample weight {err}') from None
    memory = {(i, j) for i in blocks for j in blocks[i]
              if f'stages.{i}.{j}.global_branch.proj_in.weight' in state}
    every_first = {(i, 0) for i in range(num_stages)}
    if not memory:
        placement = 'none'
    elif memory == every_first:
        placement = 'stage'
    elif len(memory) == sum(depths):
        placement = 'block'
    else:
        raise NotConvNeurClassifierError(
            f'memory in blocks {sorted(memory)} matches no memory_placement')
    cfg = dict(memory_placement=placement)
    if memory:
        i, j = min(memory)
        memory_dim = state[f'stages.{i}.{j}.global_branch.proj_in.weight'].shape[0]
        heads = state[f'stages.{i}.{j}.global_branch.memory.key_gamma'].shape[0]
        if heads != 1:
            cfg['memory_cfg'] = dict(heads=heads)
    else:  # unused without memory; take the matching arch's value if any
        memory_dim = next((a['memory_dim'] for a in ConvNeur.arch_settings.values()
                           if a['depths'] == depths and a['dims'] == dims), dims[0])
    arch = dict(depths=depths, dims=dims, memory_dim=memory_dim)
    cfg['arch'] = next((name for name, a in ConvNeur.arch_settings.items() if a == arch), arch)
    if any(k.endswith('.fuse.weight') for k in state):
        cfg['fusion'] = 'concat'
    cfg['out_indices'] = tuple(sorted(int(m[1]) for k in state
                                      for m in [re.match(r'norm(\d+)\.weight$', k)] if m))
    return cfg


def convert(checkpoint: dict, out_indices: Sequence[int] = DENSE_OUT_INDICES,
            source: str = 'the checkpoint') -> dict:
    """The backbone checkpoint (``{'meta', 'state_dict'}``, keys prefixed
    ``backbone.``) for a ConvNeur with ``out_indices`` and maps as outputs."""
    backbone, rest = split_classifier(checkpoint, source)
    try:
        cfg = infer_backbone_cfg(backbone)
        classifier = ConvNeur(**cfg)
    except (NotConvNeurClassifierError, ValueError, KeyError, IndexError) as err:
        raise _refuse(source, f'its backbone does not follow ConvNeur\'s layout: {err}') from None
    problems = compare_state_dicts(classifier, backbone)
    if problems:
        raise _refuse(source, 'its backbone does not match the ConvNeur inferred from it '
                      f'({cfg}):\n  ' + '\n  '.join(problems))
    dense_cfg = dict(cfg, out_indices=tuple(out_indices), gap_before_final_norm=False)
    target = ConvNeur(**dense_cfg).state_dict()  # fresh: output norms at weight 1, bias 0
    initialized = sorted(k for k in target if k not in backbone)
    state = {PREFIX + k: (backbone[k] if k in backbone else v).detach().clone()
             for k, v in target.items()}
    src_meta = checkpoint.get('meta') or {}
    meta = dict(
        converter=CONVERTER,
        convneur_mm_version=convneur_mm.__version__,
        source=source,
        source_meta={k: src_meta[k] for k in SOURCE_META_KEYS if k in src_meta},
        backbone=dict(type='convneur_mm.ConvNeur', **dense_cfg),
        prefix=PREFIX,
        copied_keys=len(target) - len(initialized),
        initialized_keys=[PREFIX + k for k in initialized],
        initialization='weight 1, bias 0 (ConvNeur\'s own init of its output norms): '
                       'the classifier has no such layers',
        dropped_keys=sorted(rest) + sorted(PREFIX + k for k in backbone if k not in target),
    )
    return dict(meta=meta, state_dict=state)


def convert_file(src: str, dst: str,
                 out_indices: Sequence[int] = DENSE_OUT_INDICES) -> dict:
    """Convert the checkpoint file ``src`` and save it to ``dst``; returns its meta."""
    try:
        checkpoint = _load_checkpoint(src, map_location='cpu')
    except FileNotFoundError:
        raise
    except Exception as err:  # not a torch file, or refused by the weights-only loader
        raise _refuse(src, f'it cannot be read as a checkpoint ({type(err).__name__}: '
                      f'{str(err).splitlines()[0] if str(err) else ""})') from None
    converted = convert(checkpoint, out_indices, source=src)
    converted['meta']['source_sha256'] = file_sha256(src)
    if osp.dirname(dst):
        os.makedirs(osp.dirname(dst), exist_ok=True)
    torch.save(converted, dst)
    return converted['meta']


def _describe_arch(arch: Union[str, dict]) -> str:
    return arch.upper() if isinstance(arch, str) else str(arch)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog='The output loads with zero missing and zero unexpected keys into '
               'configs/cascade_rcnn_*, fpn_* and upernet_* of the same arch.')
    parser.add_argument('src', help='classification checkpoint (tools/train.py output)')
    parser.add_argument('dst', help='where to write the backbone checkpoint')
    parser.add_argument('--out-indices', type=int, nargs='+', default=list(DENSE_OUT_INDICES),
                        help='output stages of the target backbone (default: 0 1 2 3)')
    args = parser.parse_args(argv)
    try:
        meta = convert_file(args.src, args.dst, args.out_indices)
    except (ValueError, FileNotFoundError) as err:  # refusals, bad --out-indices
        raise SystemExit(f'error: {err}')
    backbone = meta['backbone']
    print(f'{args.src} -> {args.dst}')
    print(f'  arch {_describe_arch(backbone["arch"])}, memory placement '
          f'{backbone["memory_placement"]}, out_indices {backbone["out_indices"]}')
    print(f'  copied {meta["copied_keys"]} backbone tensors; dropped '
          f'{len(meta["dropped_keys"])} ({_sample(meta["dropped_keys"], 3)})')
    if meta['initialized_keys']:
        print(f'  NOT pretrained, written at {meta["initialization"]}:\n    ' +
              ', '.join(meta['initialized_keys']))
    print(f'Load it with CONVNEUR_PRETRAINED={args.dst} or --cfg-options '
          f'model.backbone.init_cfg.checkpoint={args.dst}')


if __name__ == '__main__':
    main()
