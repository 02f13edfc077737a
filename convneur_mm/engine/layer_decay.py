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

from mmengine.optim import DefaultOptimWrapperConstructor
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
    layer_decay_rate=0.8))``.
    """

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   **kwargs) -> None:
        super().add_params(params, module, prefix, **kwargs)
        if prefix == '':  # the model: every parameter has its group now
            self._decay_by_depth(params, module)

    def _decay_by_depth(self, params: List[dict], model: nn.Module) -> None:
        rate = self.paramwise_cfg.get('layer_decay_rate', 1.0)
        backbone = getattr(model, 'backbone', None)
        if not hasattr(backbone, 'get_layer_depth'):
            raise TypeError(
                'layer-wise learning-rate decay needs the model\'s backbone to define '
                f'get_layer_depth(param_name, prefix); {type(model).__name__}.backbone '
                f'is {type(backbone).__name__}')
        names = {id(p): name for name, p in model.named_parameters()}
        for group in params:
            depth, num_layers = backbone.get_layer_depth(names[id(group['params'][0])],
                                                         'backbone.')
            group['lr'] = group.get('lr', self.base_lr) * rate**(num_layers - 1 - depth)
