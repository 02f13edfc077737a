"""ConvNeur's classifiers in MMPretrain's model hub.

``mmpretrain.list_models('convneur*')``, ``get_model(name)`` and
``inference_model`` read MMPretrain's ``ModelHub``, which loads only
MMPretrain's own ``.mim/model-index.yml``. Importing convneur_mm registers our
ImageNet metafile (``configs/metafiles/in1k.yml``) there as soon as
``mmpretrain.apis.model`` is imported (at once if it already is): importing
convneur_mm stays cheap and imports no toolbox. Only the classifiers go to the
hub; MMPretrain cannot build our detectors and segmentors (``mim search
convneur_mm`` lists those, from ``model-index.yml``).

No weights exist: the paper's authors released none and none were trained
here, so the metafiles' Weights are empty and their Results are the paper's
Table 2. MMPretrain would meet ``pretrained=True`` (``get_model``'s option, and
the default of its inferencers) with a warning and a randomly initialised
model; here it fails with :class:`NoPretrainedWeightsError` instead.
"""
import os.path as osp
from typing import List

from .utils.import_hooks import when_imported
from .utils.paths import config_dir

HUB_MODULE = 'mmpretrain.apis.model'
# relative to the directory that holds configs/ (the repository or .mim/)
CLASSIFICATION_METAFILE = osp.join('configs', 'metafiles', 'in1k.yml')
NO_WEIGHTS_SCHEME = 'convneur-no-weights://'

_registered: List[str] = []


class NoPretrainedWeightsError(FileNotFoundError):
    """A model-hub name was asked for pretrained weights, and none exist."""


def metafile_root() -> str:
    """The directory the metafiles' ``Config`` paths are relative to."""
    return osp.dirname(config_dir())


def load_from_no_weights(filename: str, map_location=None):
    """MMEngine's CheckpointLoader for NO_WEIGHTS_SCHEME (it logs the name after
    ``load_from_``): always refuses."""
    name = filename[len(NO_WEIGHTS_SCHEME):]
    raise NoPretrainedWeightsError(
        f'{name}: no pretrained weights exist (the paper released none and none were '
        f'trained here; its metafile quotes the paper\'s accuracy). Use pretrained=False '
        f'for a randomly initialised model, or pretrained="path/to/checkpoint.pth" with '
        f'one you trained.')


def register_with_mmpretrain() -> List[str]:
    """Register the classifiers with MMPretrain's ModelHub (once); return their names."""
    if _registered:
        return list(_registered)
    from mmengine.runner import CheckpointLoader
    from mmpretrain.apis.model import ModelHub

    before = set(ModelHub._models_dict)
    ModelHub.register_model_index(osp.join(metafile_root(), CLASSIFICATION_METAFILE),
                                  config_prefix=metafile_root())
    names = sorted(set(ModelHub._models_dict) - before)
    # get_model(name, pretrained=True) loads metainfo.weights: route it to the refusal
    for name in names:
        ModelHub._models_dict[name].weights = NO_WEIGHTS_SCHEME + name
    CheckpointLoader.register_scheme(NO_WEIGHTS_SCHEME, load_from_no_weights)
    _registered.extend(names)
    return names


def register_when_mmpretrain_is_imported() -> None:
    when_imported(HUB_MODULE, lambda module: register_with_mmpretrain())
