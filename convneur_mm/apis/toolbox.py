"""Building any of our configs' models, and feeding them a dummy image.

Used by the smoke run, the FLOPs tool and the benchmarks; it imports the
toolbox named by the config's ``default_scope`` only when asked to.
"""
import importlib
import logging
import os.path as osp
import traceback
from contextlib import contextmanager
from importlib import metadata
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope
from torch import nn


SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


@contextmanager
def quiet_init():
    """Silence MMEngine's per-parameter INFO lines from ``init_weights``."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class ToolboxImportError(ImportError):
    """A toolbox fails to import for a reason outside this project."""


def _installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def import_toolbox(scope: str, importer: Callable[[str], ModuleType] = importlib.import_module,
                   version: Callable[[str], Optional[str]] = _installed_version) -> ModuleType:
    """The toolbox's registry module, its models imported (as building a
    model would); a clear error where a known conflict stops the toolbox from
    importing: mmpretrain 1.2 imports its multimodal models whenever
    transformers >= 4.28 is installed, and beside transformers 5 that import
    fails deep inside (``TypeError: NoneType takes no arguments``)."""
    try:
        registry = importer(f'{scope}.registry')
        registry.MODELS.import_from_location()
        return registry
    except Exception as exc:
        transformers = version('transformers')
        if (scope == 'mmpretrain' and transformers and int(transformers.split('.')[0]) >= 5
                and _from_transformers(exc)):
            raise ToolboxImportError(
                f'mmpretrain {version("mmpretrain")} cannot be imported beside transformers '
                f'{transformers} ({type(exc).__name__}: {exc}): it imports its multimodal '
                'models whenever transformers is installed, and they need transformers < 5. '
                'Uninstall transformers or install "transformers<5" in this environment '
                '(docs/get_started.md).') from exc
        raise


def _from_transformers(exc: BaseException) -> bool:
    """Whether a failed import comes from transformers: raised inside it, or
    mmpretrain's subclassing of a transformers name it set to None when the
    import failed (``class BlipTokenizer(BertTokenizerFast)``)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return ('NoneType takes no arguments' in str(exc)
            or any(f'{osp.sep}transformers{osp.sep}' in frame.filename for frame in frames))


def check_toolbox(cfg: Config) -> None:
    """Fail before a run starts if the config's toolbox cannot be imported."""
    if cfg.get('default_scope') in SCOPES:
        import_toolbox(cfg.default_scope)


def build_model(cfg: Config, init: bool = True) -> nn.Module:
    """The config's model, built through its toolbox's registry."""
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ValueError(f'config default_scope must be one of {SCOPES}, got {scope!r}')
    registry = import_toolbox(scope).MODELS
    init_default_scope(scope)
    model_cfg = cfg.model.copy()
    if 'data_preprocessor' in cfg:  # top level in MMPretrain configs: as the Runner does
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = registry.build(model_cfg)
    if init:
        with quiet_init():
            model.init_weights()
    return model


def data_sample(scope: str, size: Tuple[int, int]):
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return DetDataSample(metainfo=dict(img_shape=size, ori_shape=size,
                                           scale_factor=(1.0, 1.0)))
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return SegDataSample(metainfo=dict(img_shape=size, ori_shape=size))
    from mmpretrain.structures import DataSample
    return DataSample(metainfo=dict(img_shape=size, ori_shape=size))


def dummy_batch(model: nn.Module, scope: str, size: Tuple[int, int],
                batch_size: int = 1, seed: Optional[int] = 0) -> dict:
    """A preprocessed batch of random images of ``size`` (H, W)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    inputs = [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=gen)
              for _ in range(batch_size)]
    samples = [data_sample(scope, size) for _ in range(batch_size)]
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=False)


def tensor_forward(model: nn.Module, batch: dict):
    """The model's raw network outputs (MMEngine's ``mode='tensor'``)."""
    return model(batch['inputs'], batch['data_samples'], mode='tensor')
