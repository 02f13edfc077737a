"""Stop a training run at its first non-finite loss or gradient, and say where.

``NonFiniteStopHook`` (in every shipped config's ``custom_hooks``) checks the
gradients in a pre-hook of the optimizer's ``step`` (so a poisoned update is
never applied and the last checkpoint stays the last good one) and the loss
terms after every iteration, on every rank together. It raises
``NonFiniteTrainingError`` naming the iteration, the non-finite loss terms and
the first module group whose gradient is non-finite (``module_group``).
With ``log_group_norms=True`` it also logs each group's gradient norm every
iteration, the per-group view a diverging run needs.
"""
import logging
import math
import re
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.dist import all_gather, is_distributed
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop
from torch import nn

from convneur_mm.registry import HOOKS

_STAGE_CONTAINERS = ('stages', 'layers', 'blocks')


class NonFiniteTrainingError(RuntimeError):
    """A loss term or a gradient became NaN or infinite."""


def module_group(name: str) -> str:
    """The module group of a detector's, segmentor's or classifier's parameter.

    ConvNeur's backbone splits into ``backbone.stem`` (the first downsampling
    layer), ``backbone.stage{i}.local`` (the stage's downsampling, local
    branches and norms) and ``backbone.stage{i}.global`` (its global branch),
    stages counted from 1 as in the paper. Other backbones group by their
    stage containers (ResNet's ``layer{i}``) or fall back to ``backbone``.
    Outside the backbone a parameter's group is its top-level module:
    ``neck``, ``rpn_head``, ``roi_head``, ``decode_head``, ``head``, ...

    Args:
        name: a parameter's name in the model, with or without a wrapper's
            ``module.`` prefix.
    """
    parts = name.split('.')
    if parts[0] == 'module':
        parts = parts[1:]
    if parts[0] != 'backbone' or len(parts) < 3:
        return parts[0]
    inner = parts[1:]
    if inner[0] == 'downsample_layers' and inner[1].isdigit():
        index = int(inner[1])
        return 'backbone.stem' if index == 0 else f'backbone.stage{index + 1}.local'
    if inner[0] in _STAGE_CONTAINERS and inner[1].isdigit():
        stage = f'backbone.stage{int(inner[1]) + 1}'
        if 'global_branch' in inner:
            return f'{stage}.global'
        return f'{stage}.local'
    norm = re.fullmatch(r'norm(\d+)', inner[0])
    if norm:
        return f'backbone.stage{int(norm[1]) + 1}.local'
    layer = re.fullmatch(r'layer(\d+)', inner[0])  # ResNet
    if layer:
        return f'backbone.stage{layer[1]}'
    if inner[0] in ('stem', 'conv1', 'bn1', 'norm1'):
        return 'backbone.stem'
    return 'backbone'


def _terms(value) -> list:
    """A loss entry's tensors or numbers: MMDetection's heads give some
    entries as a list, one term per feature level."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _finite(value) -> bool:
    return all(bool(torch.isfinite(v.detach()).all()) if isinstance(v, torch.Tensor)
               else math.isfinite(float(v)) for v in _terms(value))


def _shown(value) -> float:
    """A loss entry as MMEngine's ``parse_losses`` logs it: the sum of its terms' means."""
    return sum(float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
               for v in _terms(value))


def _format_losses(losses: Optional[Dict]) -> str:
    if not losses:
        return 'none recorded'
    bad = [f'{k}={_shown(v)}' for k, v in losses.items() if 'loss' in k and not _finite(v)]
    if len(bad) > 1:  # the total beside its terms says nothing more
        bad = [b for b in bad if not b.startswith('loss=')]
    return ', '.join(bad) if bad else 'all finite on this rank'


@HOOKS.register_module()
class NonFiniteStopHook(Hook):
    """Stop training within one iteration of a non-finite loss or gradient.

    Args:
        log_group_norms: also log every module group's gradient L2 norm at
            each optimizer step (``grad_norm.<group>``). Off by default: the
            finiteness check alone is one reduction and one host read a step.
        min_loss_scale: with a dynamic fp16 loss scaler, non-finite gradients
            only skip the step and halve the scale; a scale below this means
            they overflow at every scale, and the run stops.
    """
    priority = 'VERY_HIGH'

    def __init__(self, log_group_norms: bool = False, min_loss_scale: float = 1.0):
        self.log_group_norms = log_group_norms
        self.min_loss_scale = min_loss_scale
        self._losses: Optional[Dict] = None
        self._handles: List = []

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._groups = [module_group(n) for n in self._names]
        self._group_names = list(dict.fromkeys(self._groups))
        self._group_index = torch.tensor([self._group_names.index(g) for g in self._groups])
        self._runner = runner
        self._handles.append(model.register_forward_hook(self._record_losses, with_kwargs=True))
        wrappers = (runner.optim_wrapper.values()
                    if hasattr(runner.optim_wrapper, 'optim_wrappers')
                    else [runner.optim_wrapper])
        for wrapper in wrappers:
            self._handles.append(
                wrapper.optimizer.register_step_pre_hook(lambda *_: self._check_gradients()))

    def after_train(self, runner) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record_losses(self, module, args, kwargs, output) -> None:
        if kwargs.get('mode') == 'loss' and isinstance(output, dict):
            self._losses = {k: v for k, v in output.items()}

    def _where(self) -> str:
        runner = self._runner
        by_epoch = isinstance(getattr(runner, 'train_loop', None), EpochBasedTrainLoop)
        epoch = f' (epoch {runner.epoch + 1})' if by_epoch else ''
        return f'iteration {runner.iter + 1}{epoch}'

    def _check_gradients(self) -> None:
        """Before the optimizer applies the gradients (after DDP's all-reduce,
        and after an fp16 scaler has unscaled them): every rank holds the same
        gradients, so every rank reaches the same verdict without talking."""
        present = [(i, p.grad) for i, p in enumerate(self._params) if p.grad is not None]
        if not present:
            return
        indices, grads = zip(*present)
        norms = torch.stack([n.float() for n in torch._foreach_norm(list(grads))])
        if self.log_group_norms:
            index = self._group_index[list(indices)].to(norms.device)
            squares = torch.zeros(len(self._group_names), device=norms.device)
            squares.index_add_(0, index, norms.square())
            for name, value in zip(self._group_names, squares.sqrt().tolist()):
                self._runner.message_hub.update_scalar(f'train/grad_norm.{name}', value)
        if bool(torch.isfinite(norms).all()):
            return
        bad = [i for i, n in zip(indices, norms.tolist()) if not math.isfinite(n)]
        groups = list(dict.fromkeys(self._groups[i] for i in bad))
        self._stop(
            f'non-finite training at {self._where()}: loss terms '
            f'{_format_losses(self._losses)}; first non-finite gradient in group '
            f'{groups[0]!r} (parameter {self._names[bad[0]]}); non-finite in '
            f'{len(groups)} of {len(self._group_names)} groups: {", ".join(groups)}')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs: Optional[Dict] = None) -> None:
        losses = dict(outputs or {})
        bad = not all(_finite(v) for k, v in losses.items() if 'loss' in k)
        scaler = getattr(runner.optim_wrapper, 'loss_scaler', None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        collapsed = scale is not None and scale < self.min_loss_scale
        flags = torch.tensor([float(bad), float(collapsed)])
        bad_ranks = []  # named only where the bad loss is another rank's
        if is_distributed():  # a NaN on one rank stops every rank, none left in a collective
            device = next(iter(self._params)).device if self._params else flags.device
            # gathered, not summed: the message names the ranks whose loss was not finite
            every = torch.stack(all_gather(flags.to(device))).cpu()
            bad_ranks = [r for r, f in enumerate(every[:, 0].tolist()) if f]
            flags = every.max(0).values
        bad, collapsed = (bool(f) for f in flags.tolist())
        if not (bad or collapsed):
            self._losses = None
            return
        reasons = [f'loss terms {_format_losses(losses)}'] if bad else []
        if bad and all(_finite(v) for k, v in losses.items() if 'loss' in k):
            reasons = [f'a loss term on rank {", ".join(map(str, bad_ranks))}']
        if collapsed:
            reasons.append(f'the fp16 loss scale fell to {scale} (< {self.min_loss_scale}): '
                           'gradients overflow at every scale')
        self._stop(f'non-finite training at {self._where()}: {"; ".join(reasons)}; no '
                   'checkpoint is written after it')

    @staticmethod
    def _stop(message: str) -> None:
        """Raise with ``message``, logged first: the work dir's log then says
        why the run ended, where the traceback goes to stderr only."""
        print_log(message, logger='current', level=logging.ERROR)
        raise NonFiniteTrainingError(message)


def module_groups(model: nn.Module) -> Dict[str, Sequence[str]]:
    """Each module group of ``model`` (``module_group``) with its parameters' names."""
    groups: Dict[str, List[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(module_group(name), []).append(name)
    return groups
