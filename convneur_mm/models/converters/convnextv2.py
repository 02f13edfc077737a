"""Published ConvNeXt-V2 checkpoints as ConvNeur's local network.

ConvNeur's local branch is the ConvNeXt-V2 block (7x7 depthwise conv, LN,
Linear 4x, GELU, GRN, Linear; no layer scale) and its stem, downsampling
layers and output norm are ConvNeXt's. ConvNeXt-V2 atto, femto, pico and
nano have exactly the local network of ConvNeur M1, M2, M3 and M4, tensor for
tensor; only the names differ. ``KEY_TABLE`` names every tensor in ConvNeur's
classifier layout and in the three published layouts:

* ``official``: facebookresearch/ConvNeXt-V2 ``models/convnextv2.py``
  (``{'model': state_dict}``; GRN's ``gamma``/``beta`` are (1, 1, 1, 4C));
* ``mmpretrain``: ``ConvNeXt(use_grn=True, layer_scale_init_value=0.)`` in an
  ``ImageClassifier`` (``{'state_dict': ...}``, keys ``backbone.*``, ``head.fc.*``);
* ``timm``: ``convnextv2_*`` (a bare state dict, ``.pth`` or ``.safetensors``).

The global branches have no counterpart in any of them: the converter writes
them at ConvNeur's own initialization and lists them in the checkpoint's meta,
and ``ConvNeur(global_init='warm')`` (``warm_start_blocks``) may then start them
so that the network computes what ConvNeXt-V2 computed.

``convert(checkpoint, target, backbone_cfg)`` fills the state dict of a
ConvNeur the caller built (``backbone_cfg(arch, task)``'s arguments, the arch
from ``source_arch(checkpoint)``): the tool builds the model, this module only
maps tensors, so it imports nothing from the backbone.
"""
import re
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from ..utils.warm_start import CONVERTER, ConvNeXtV2CheckpointError, global_branch_modules

__all__ = ['ConvNeXtV2CheckpointError', 'KEY_TABLE', 'SIZES', 'TASKS', 'backbone_cfg', 'convert',
           'source_arch', 'to_convneur_keys', 'unwrap']

Tensors = Dict[str, torch.Tensor]

FORMATS = ('official', 'mmpretrain', 'timm')

# One row per tensor family: ConvNeur's classifier key (backbone and MMPretrain
# head), then the official, mmpretrain and timm keys. Fields: {i} a stage,
# {s} a stage after the first, {j} a block, {k} the position in a
# downsampling layer, {p} weight or bias.
KEY_TABLE: Tuple[Tuple[str, str, str, str], ...] = (
    ('backbone.downsample_layers.0.{k}.{p}', 'downsample_layers.0.{k}.{p}',
     'backbone.downsample_layers.0.{k}.{p}', 'stem.{k}.{p}'),
    ('backbone.downsample_layers.{s}.{k}.{p}', 'downsample_layers.{s}.{k}.{p}',
     'backbone.downsample_layers.{s}.{k}.{p}', 'stages.{s}.downsample.{k}.{p}'),
    ('backbone.stages.{i}.{j}.local_branch.dwconv.{p}', 'stages.{i}.{j}.dwconv.{p}',
     'backbone.stages.{i}.{j}.depthwise_conv.{p}', 'stages.{i}.blocks.{j}.conv_dw.{p}'),
    ('backbone.stages.{i}.{j}.local_branch.norm.{p}', 'stages.{i}.{j}.norm.{p}',
     'backbone.stages.{i}.{j}.norm.{p}', 'stages.{i}.blocks.{j}.norm.{p}'),
    ('backbone.stages.{i}.{j}.local_branch.pwconv1.{p}', 'stages.{i}.{j}.pwconv1.{p}',
     'backbone.stages.{i}.{j}.pointwise_conv1.{p}', 'stages.{i}.blocks.{j}.mlp.fc1.{p}'),
    ('backbone.stages.{i}.{j}.local_branch.grn.gamma', 'stages.{i}.{j}.grn.gamma',
     'backbone.stages.{i}.{j}.grn.gamma', 'stages.{i}.blocks.{j}.mlp.grn.weight'),
    ('backbone.stages.{i}.{j}.local_branch.grn.beta', 'stages.{i}.{j}.grn.beta',
     'backbone.stages.{i}.{j}.grn.beta', 'stages.{i}.blocks.{j}.mlp.grn.bias'),
    ('backbone.stages.{i}.{j}.local_branch.pwconv2.{p}', 'stages.{i}.{j}.pwconv2.{p}',
     'backbone.stages.{i}.{j}.pointwise_conv2.{p}', 'stages.{i}.blocks.{j}.mlp.fc2.{p}'),
    # the output norm after global pooling (ConvNeur's norm of the last stage)
    ('backbone.norm{last}.{p}', 'norm.{p}', 'backbone.norm{last}.{p}', 'head.norm.{p}'),
    ('head.fc.{p}', 'head.{p}', 'head.fc.{p}', 'head.fc.{p}'),
)
# ConvNeXt-V1's layer scale, in the same three layouts (refused: ConvNeur has none)
LAYER_SCALE = ('stages.{i}.{j}.gamma', 'backbone.stages.{i}.{j}.gamma',
               'stages.{i}.blocks.{j}.gamma')
FIELDS = dict(i=r'\d+', s=r'[1-9]\d*', j=r'\d+', k=r'[01]', p=r'weight|bias', last=r'\d+')
# a key each layout has and the others lack: how a checkpoint's format is found
MARKERS = dict(official='downsample_layers.0.0.weight',
               mmpretrain='backbone.downsample_layers.0.0.weight', timm='stem.0.weight')

# ConvNeXt-V2 sizes (the ConvNeXt-V2 paper's Table) and ConvNeur's arch for each
SIZES = {
    'atto': ([2, 2, 6, 2], [40, 80, 160, 320]),
    'femto': ([2, 2, 6, 2], [48, 96, 192, 384]),
    'pico': ([2, 2, 6, 2], [64, 128, 256, 512]),
    'nano': ([2, 2, 8, 2], [80, 160, 320, 640]),
    'tiny': ([3, 3, 9, 3], [96, 192, 384, 768]),
    'base': ([3, 3, 27, 3], [128, 256, 512, 1024]),
    'large': ([3, 3, 27, 3], [192, 384, 768, 1536]),
    'huge': ([3, 3, 27, 3], [352, 704, 1408, 2816]),
}
CONVNEUR_ARCH = {'atto': 'm1', 'femto': 'm2', 'pico': 'm3', 'nano': 'm4'}


def _pattern(template: str) -> 're.Pattern':
    regex = re.escape(template)
    for field, values in FIELDS.items():
        regex = regex.replace(re.escape('{' + field + '}'), f'(?P<{field}>{values})')
    return re.compile(regex + '$')


def _fill(template: str, fields: Dict[str, str]) -> str:
    return template.format(**fields)


COLUMNS = {fmt: [_pattern(row[1 + n]) for row in KEY_TABLE] for n, fmt in enumerate(FORMATS)}


def unwrap(checkpoint: dict) -> Tensors:
    """The state dict inside a checkpoint of any of the three layouts:
    ``state_dict`` (MMEngine), ``model`` (the official training script) or
    the dict itself (timm); a ``module.`` prefix (DDP) is dropped."""
    if not isinstance(checkpoint, dict):
        raise ConvNeXtV2CheckpointError(f'the file holds a {type(checkpoint).__name__}, '
                                        'not a checkpoint dict')
    state = checkpoint
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    tensors = {k[len('module.'):] if k.startswith('module.') else k: v
               for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConvNeXtV2CheckpointError(f'no tensors found (top-level keys: '
                                        f'{_sample(checkpoint)})')
    return tensors


def _sample(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    return ', '.join(keys[:limit]) + (f' ... ({len(keys)} in all)' if len(keys) > limit else '')


def detect_format(state: Tensors) -> str:
    """'official', 'mmpretrain' or 'timm', by a stem key only that layout has."""
    found = [fmt for fmt, key in MARKERS.items() if key in state]
    if len(found) != 1:
        raise ConvNeXtV2CheckpointError(
            'not a ConvNeXt-V2 checkpoint in a known layout: expected exactly one of the '
            f'stem keys {sorted(MARKERS.values())} (official, mmpretrain, timm), found '
            f'{found or "none"} among e.g. {_sample(state)}')
    return found[0]


def _refuse_layer_scale(state: Tensors, fmt: str) -> None:
    pattern = _pattern(LAYER_SCALE[FORMATS.index(fmt)])
    scales = [k for k in state if pattern.match(k)]
    if scales:
        grn = any('grn' in k for k in state)
        what = ('a ConvNeXt-V1 checkpoint (layer scale, no GRN)' if not grn else
                'a ConvNeXt-V2 with layer scale (mmpretrain layer_scale_init_value > 0)')
        raise ConvNeXtV2CheckpointError(
            f'this is {what}: found {len(scales)} layer-scale tensors such as {scales[0]} '
            f'{tuple(state[scales[0]].shape)}. ConvNeur\'s local branch is the ConvNeXt-V2 '
            'block: GRN, no layer scale. Use a ConvNeXt-V2 checkpoint (atto, femto, pico '
            'or nano).')


def to_convneur_keys(state: Tensors, fmt: Optional[str] = None) -> Tuple[Tensors, str]:
    """Rename a ConvNeXt-V2 state dict to ConvNeur's classifier keys
    (``backbone.*`` and ``head.fc.*``) by ``KEY_TABLE``; the tensors are
    shared, not copied. Returns (renamed state, format).

    Raises:
        ConvNeXtV2CheckpointError: unknown layout, layer scale (ConvNeXt-V1),
            or keys the table does not know.
    """
    fmt = fmt or detect_format(state)
    if fmt not in FORMATS:
        raise ConvNeXtV2CheckpointError(f'format must be one of {FORMATS}, got {fmt!r}')
    _refuse_layer_scale(state, fmt)
    stage = re.compile(r'(?:backbone\.)?stages\.(\d+)\.')
    last = max((int(m[1]) for m in map(stage.match, state) if m), default=0)
    renamed, unknown = {}, []
    for key, tensor in state.items():
        for row, pattern in zip(KEY_TABLE, COLUMNS[fmt]):
            match = pattern.match(key)
            if match and match.groupdict().get('last', str(last)) == str(last):
                renamed[_fill(row[0], dict(match.groupdict(), last=last))] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConvNeXtV2CheckpointError(
            f'{len(unknown)} tensors of this {fmt}-format checkpoint have no place in '
            f'ConvNeur\'s local network: {_sample(unknown, 8)}')
    return renamed, fmt


def infer_size(renamed: Tensors) -> Tuple[str, str]:
    """(ConvNeXt-V2 size, ConvNeur arch) of a renamed state dict, from its
    shapes; a size ConvNeur does not have is refused with what was found."""
    blocks: Dict[int, set] = {}
    for key in renamed:
        match = re.match(r'backbone\.stages\.(\d+)\.(\d+)\.', key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    depths = [len(blocks[i]) for i in sorted(blocks)]
    dims = []
    for i in range(len(depths)):
        conv = f'backbone.downsample_layers.{i}.{0 if i == 0 else 1}.weight'
        dims.append(renamed[conv].shape[0] if conv in renamed else None)
    size = next((name for name, (d, c) in SIZES.items() if d == depths and c == dims), None)
    if size not in CONVNEUR_ARCH:
        accepted = '; '.join(f'{name} -> ConvNeur-{CONVNEUR_ARCH[name].upper()} (depths '
                             f'{SIZES[name][0]}, dims {SIZES[name][1]})' for name in CONVNEUR_ARCH)
        found = f'ConvNeXt-V2-{size}' if size else 'no ConvNeXt-V2 size'
        raise ConvNeXtV2CheckpointError(
            f'found depths {depths} and dims {dims} ({found}); ConvNeur has a local network '
            f'for these sizes only: {accepted}')
    return size, CONVNEUR_ARCH[size]


def fit_shape(tensor: torch.Tensor, shape: Sequence[int], key: str) -> torch.Tensor:
    """``tensor`` in ``shape`` where they differ by singleton dimensions only
    (the official GRN's (1, 1, 1, C), a 1x1 conv for a Linear)."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if tensor.numel() == torch.Size(shape).numel() and [s for s in tensor.shape if s != 1] == [
            s for s in shape if s != 1]:
        return tensor.reshape(shape)
    raise ConvNeXtV2CheckpointError(f'{key}: the checkpoint\'s {tuple(tensor.shape)} does not '
                                    f'fit ConvNeur\'s {tuple(shape)}')


TASKS = ('dense', 'cls')


def _inspect(checkpoint: dict) -> Tuple[Tensors, str, str, str]:
    """(renamed state, format, ConvNeXt-V2 size, ConvNeur arch) of a source."""
    renamed, fmt = to_convneur_keys(unwrap(checkpoint))
    return (renamed, fmt) + infer_size(renamed)


def source_arch(checkpoint: dict, arch: Optional[str] = None,
                source: str = 'the checkpoint') -> str:
    """The ConvNeur arch ('m1'..'m4') whose local network a ConvNeXt-V2
    checkpoint holds, found from its shapes.

    Args:
        checkpoint: the loaded source checkpoint (any of the three layouts).
        arch: the arch the caller expects; a different one is refused.
        source: the source's name for messages.
    """
    _, _, size, inferred = _inspect(checkpoint)
    if arch is not None and arch.lower() != inferred:
        raise ConvNeXtV2CheckpointError(
            f'{source} is ConvNeXt-V2-{size}, whose local network is ConvNeur-'
            f'{inferred.upper()}\'s, not {arch.upper()}\'s')
    return inferred


def backbone_cfg(arch: str, task: str = 'dense', memory_placement: str = 'stage') -> dict:
    """``ConvNeur``'s arguments for the target of a conversion.

    Args:
        arch: ConvNeur's arch ('m1'..'m4').
        task: 'dense': the four output norms of the detection and segmentation
            configs; 'cls': an MMPretrain classifier's backbone (one output
            norm, after pooling).
        memory_placement: the target's (``ConvNeur``'s argument).
    """
    if task not in TASKS:
        raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    sizes = {a: s for s, a in CONVNEUR_ARCH.items()}
    if arch not in sizes:
        raise ValueError(f'arch must be one of {sorted(sizes)}, got {arch!r}')
    last = len(SIZES[sizes[arch]][0]) - 1
    cfg = dict(arch=arch, memory_placement=memory_placement)
    if task == 'dense':
        cfg.update(out_indices=tuple(range(last + 1)), gap_before_final_norm=False)
    else:
        cfg.update(out_indices=(last, ), gap_before_final_norm=True)
    return cfg


def convert(checkpoint: dict, target: Tensors, cfg: dict, task: str = 'dense',
            source: str = 'the checkpoint', initialization: str = 'ConvNeur.init_weights()'
            ) -> dict:
    """A ConvNeur checkpoint (``{'meta', 'state_dict'}``) from a ConvNeXt-V2 one.

    Every key of ``target`` is written, so that the strict loader sees nothing
    missing: the local network (and the head) from the source, the rest (the
    global branches; a detector's norm0..norm2) as ``target`` holds them,
    each listed in ``meta['initialized_keys']`` and the global branches by
    module in ``meta['left_at_init']``.

    Args:
        checkpoint: the loaded source checkpoint (any of the three layouts).
        target: the state dict of the ConvNeur built from ``cfg`` and
            initialized (keys without ``backbone.``).
        cfg: ``backbone_cfg(...)``, the target's arguments (recorded in meta).
        task: 'dense' (``backbone.*``) or 'cls' (``backbone.*`` and
            ``head.fc.*`` when the source has a head); as given to ``cfg``.
        source: the source's name for messages and meta.
        initialization: how ``target`` was initialized, for meta.
    """
    if task not in TASKS:
        raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    renamed, fmt, size, inferred = _inspect(checkpoint)
    if cfg.get('arch') != inferred:
        raise ConvNeXtV2CheckpointError(
            f'{source} is ConvNeXt-V2-{size} (ConvNeur-{inferred.upper()}), but the target '
            f'is built as {cfg.get("arch")!r}')
    last = len(SIZES[size][0]) - 1
    target = {'backbone.' + k: v for k, v in target.items()}
    required = [k for k in target if '.global_branch.' not in k
                and not re.match(rf'backbone\.norm(?!{last}\.)\d+\.', k)]
    missing = [k for k in required if k not in renamed]
    if missing:
        raise ConvNeXtV2CheckpointError(
            f'{source} ({fmt} format) lacks {len(missing)} tensors of ConvNeur-'
            f'{inferred.upper()}\'s local network: {_sample(missing, 8)}')
    state = {k: (fit_shape(renamed[k], v.shape, k) if k in renamed else v).detach().clone()
             for k, v in target.items()}
    if task == 'cls':
        state.update({k: v.detach().clone() for k, v in renamed.items()
                      if k.startswith('head.')})
    initialized = sorted(k for k in target if k not in renamed)
    src_meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    meta = dict(
        converter=CONVERTER,
        source=source,
        source_format=fmt,
        source_model=f'ConvNeXt-V2-{size}',
        source_meta={k: v for k, v in src_meta.items() if isinstance(v, (str, int, float))},
        task=task,
        backbone=dict(type='convneur_mm.ConvNeur', **cfg),
        prefix='backbone.',
        copied_keys=len(state) - len(initialized),
        head_keys=sorted(k for k in state if k.startswith('head.')),
        initialized_keys=initialized,
        initialization=initialization,
        left_at_init=global_branch_modules(target),
        dropped_keys=sorted(k for k in renamed if k not in state),
    )
    return dict(meta=meta, state_dict=state)
