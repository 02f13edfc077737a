"""Loading ImageNet-pretrained weights into the backbone, loudly.

A silently half-loaded backbone is the classic failure of backbone
repositories; here every missing, unexpected or mis-shaped key is an error
(or, with ``strict=False`` in the init_cfg, a warning that lists them).
"""
import logging
import os.path as osp
import re
from typing import Dict, Iterable, List, Optional

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import _load_checkpoint
from torch import nn

from convneur_mm.utils.paths import is_remote


# a backbone's output norms (``norm0``..``norm3``): a dense task's checkpoint
# has one per output, a model built with fewer ``out_indices`` fewer
OUTPUT_NORM = re.compile(r'norm\d+\.')


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model it is loaded into."""


def extract_state_dict(checkpoint: dict, prefix: str = '') -> Dict[str, torch.Tensor]:
    """The (optionally prefix-filtered) state dict of a loaded checkpoint."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointMismatchError('checkpoint holds no state dict')
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointMismatchError(f'no key of the checkpoint starts with {prefix!r}')
    return state


def _short(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def compare_state_dicts(model: nn.Module, state: Dict[str, torch.Tensor],
                        absent_ok: Optional[re.Pattern] = None) -> List[str]:
    """Human-readable problems of loading ``state`` into ``model`` (empty if
    none); keys matching ``absent_ok`` may be missing or unexpected (their
    shapes are still compared)."""
    own = model.state_dict()
    problems = []
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    if absent_ok is not None:
        missing = {k for k in missing if not absent_ok.match(k)}
        unexpected = {k for k in unexpected if not absent_ok.match(k)}
    if missing:
        problems.append(f'{len(missing)} missing keys: {_short(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys: {_short(unexpected)}')
    shapes = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}'
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if shapes:
        problems.append(f'{len(shapes)} shape mismatches: ' + '; '.join(shapes[:10]))
    return problems


def check_checkpoint_fits(model: nn.Module, checkpoint: str, backbone_only: bool = False
                          ) -> None:
    """Raise ``CheckpointMismatchError`` unless the checkpoint's state dict has
    exactly the keys and shapes of ``model`` (an evaluation or a resume must
    not run on a half-loaded model: MMEngine's ``load_from`` only logs what
    does not fit).

    Args:
        backbone_only: compare ``model.backbone`` with the checkpoint's
            ``backbone.`` keys only, output norms (``norm0``..) allowed to be
            absent on either side: what a training's ``load_from`` must
            load, where another task's head may differ. A model without a
            ``backbone`` is not checked.
    """
    if backbone_only and not hasattr(model, 'backbone'):
        return
    state = extract_state_dict(_load_checkpoint(checkpoint, map_location='cpu'))
    if backbone_only:
        prefix = 'backbone.'
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        problems = compare_state_dicts(model.backbone, state, OUTPUT_NORM)
        where = 'the backbone of this config'
        hint = ('\nTo load what fits on purpose, load it as the backbone\'s init_cfg '
                "(type='Pretrained', prefix='backbone.', strict=False) instead.")
    else:
        problems, where, hint = compare_state_dicts(model, state), 'the model of this config', ''
    if problems:
        raise CheckpointMismatchError(
            f'checkpoint {checkpoint} does not fit {where}:\n  ' + '\n  '.join(problems) + hint)


def load_pretrained_backbone(model: nn.Module, checkpoint: str, prefix: str = '',
                             strict: bool = True, skip_unexpected: bool = False
                             ) -> Optional[dict]:
    """Load the weights under ``prefix`` of ``checkpoint`` into ``model``;
    ``skip_unexpected``: the output norms the model has no place for (those
    of other ``out_indices``, ``OUTPUT_NORM``) are left out; any other key,
    missing or unexpected, and every shape are still checked (another
    model's weights must not load where they happen to fit).

    Returns:
        The checkpoint's ``meta`` (None without one), so that a caller needs
        not read the file again.

    Raises:
        FileNotFoundError: the checkpoint path does not exist.
        CheckpointMismatchError: keys or shapes differ and ``strict`` is True;
            with ``strict=False`` the differences are logged as a warning and
            only the fitting tensors are loaded.
    """
    name = type(model).__name__
    if not is_remote(checkpoint) and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'{name}: pretrained checkpoint not found: {checkpoint}')
    loaded = _load_checkpoint(checkpoint, map_location='cpu')
    state = extract_state_dict(loaded, prefix)
    if skip_unexpected:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not OUTPUT_NORM.match(k)}
    problems = compare_state_dicts(model, state)
    if problems:
        message = (f'{name}: checkpoint {checkpoint} does not fit the model:\n  ' +
                   '\n  '.join(problems))
        if strict:
            raise CheckpointMismatchError(
                message + '\nConvert classification checkpoints with '
                'tools/model_converters/cls_to_backbone.py, or pass strict=False '
                'in init_cfg to load what fits.')
        print_log(message + '\nLoading the matching tensors only (strict=False).',
                  logger='current', level=logging.WARNING)
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(state, strict=False)
    print_log(f'{name}: loaded {len(state)} tensors from {checkpoint}', logger='current')
    return loaded.get('meta') if isinstance(loaded, dict) else None
