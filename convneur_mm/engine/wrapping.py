"""The model inside its wrappers, and test-time augmentation from a config.

``tools/test.py --tta`` wraps the config's model in the config's
``tta_model`` (MMSegmentation's ``SegTTAModel``: the logits of every view
averaged) and feeds it ``tta_pipeline``, as the toolboxes' own test scripts
do. MMEngine loads a checkpoint through the wrapper into the model inside.
"""
from mmengine.config import Config, ConfigDict
from mmengine.model import BaseTTAModel, is_model_wrapper
from torch import nn


def inner_model(model: nn.Module) -> nn.Module:
    """The toolbox model inside DDP-like wrappers and a test-time-augmentation model."""
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def enable_tta(cfg: Config) -> None:
    """Test with the config's ``tta_model`` around its model, on its ``tta_pipeline``."""
    missing = [key for key in ('tta_model', 'tta_pipeline') if not cfg.get(key)]
    if missing:
        raise ValueError(
            f'--tta needs {" and ".join(missing)} in the config (the ADE20K configs inherit '
            "MMSegmentation's: 6 scales x 2 flips); this config has none")
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
