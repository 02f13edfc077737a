"""What the task tests share: a real config on tiny data, trained briefly."""
from typing import Set, Tuple

import torch
from mmengine.config import Config

from convneur_mm.demo_data.coco import CLASSES, ann_file
from convneur_mm.apis.launch import SPLITS, build_runner
from ..paths import REPO


def on_tiny_data(cfg: Config, data_root: str, **dataset_options) -> Config:
    """Point every split of ``cfg`` at ``data_root``, loading in-process."""
    for split in SPLITS:
        cfg[split].update(num_workers=0, persistent_workers=False)
        cfg[split].dataset.update(data_root=data_root, **dataset_options)
    return cfg


def on_tiny_coco(cfg: Config, data_root: str) -> Config:
    """A detection config on the tiny COCO set: its classes, its evaluators'
    annotation file."""
    on_tiny_data(cfg, data_root, metainfo=dict(classes=CLASSES))
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = ann_file(data_root, 'val')
    return cfg


def train_and_diff(cfg: Config) -> Tuple[object, Set[str]]:
    """Initialize and train as ``cfg`` says; returns the runner and the
    top-level modules (backbone, neck, ...) whose weights changed."""
    runner = build_runner(cfg)
    runner.model.init_weights()
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    runner.train()
    changed = {k.split('.')[0] for k, v in runner.model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])}
    return runner, changed
