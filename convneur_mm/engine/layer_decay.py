"""Layer-wise learning-rate decay for detectors, segmentors and classifiers.

Fine-tuning recipes of ConvNeXt-style backbones often shrink the learning rate
layer by layer towards the stem. MMDetection's and MMSegmentation's
``LearningRateDecayOptimizerConstructor`` recognise ConvNeXt by its class name
and raise a bare ``NotImplementedError`` for any other backbone; MMPretrain's
asks the whole model for ``get_layer_depth`` (classifiers have it, detectors
and segmentors do not) and drops ``custom_keys``' ``lr_mult``. This one asks
the backbone, and composes with MMEngine's paramwise options.
"""
from typing import List

from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from torch import nn

from convneur_mm.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg.layer_decay_rate`` r: a backbone parameter at depth d
    of the backbone's D (``backbone.get_layer_depth``, as ConvNeur and
    MMPretrain's backbones define it) trains at its learning rate times
    r ** (D - 1 - d): the stem at r ** (D - 1), the output norms, neck and
    heads at 1 (MMPretrain's rule). Every other ``paramwise_cfg`` option
    (``custom_keys``' ``lr_mult`` and ``decay_mult``, ``norm_decay_mult``, ...)
    applies as in MMEngine's default constructor, the decay multiplying it.

    In a config: ``optim_wrapper = dict(constructor=
    'convneur_mm.LayerDecayOptimWrapperConstructor', paramwise_cfg=dict(
    layer_decay_rate=0.8))``. MMEngine logs the first group's learning rate,
    which is the stem's: the configured rate times r ** (D - 1).
    """

    def __call__(self, model: nn.Module) -> OptimWrapper:
        optim_wrapper = super().__call__(model)
        if 'layer_decay_rate' in self.paramwise_cfg:
            self._decay_by_depth(optim_wrapper.optimizer.param_groups,
                                 getattr(model, 'module', model))  # DDP: the model inside
        return optim_wrapper

    def _decay_by_depth(self, groups: List[dict], model: nn.Module) -> None:
        """Scale each parameter's group (MMEngine's paramwise groups hold one
        parameter each); the optimizer has filled in every group's ``lr``."""
        rate = self.paramwise_cfg['layer_decay_rate']
        backbone = getattr(model, 'backbone', None)
        if not hasattr(backbone, 'get_layer_depth'):
            raise TypeError(
                'layer-wise learning-rate decay needs the model\'s backbone to define '
                f'get_layer_depth(param_name, prefix); {type(model).__name__}.backbone '
                f'is {type(backbone).__name__}')
        names = {id(p): name for name, p in model.named_parameters()}
        for group in groups:
            param, = group['params']
            depth, num_layers = backbone.get_layer_depth(names[id(param)], 'backbone.')
            # a new value: a tensor lr is shared with optimizer.defaults
            group['lr'] = group['lr'] * rate**(num_layers - 1 - depth)
