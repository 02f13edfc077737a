"""The paper's Table 5 as configs, and one training recipe shared by its rows.

Every row is an ImageNet config in ``configs/ablations/`` that inherits
ConvNeur-M3's and changes only the row's switch; its ``table5`` entry names
the row and holds the paper's figures. A *recipe* is any classification
config (e.g. the tiny-ImageNet demo, or the global-context probe): a row is
trained under a recipe by keeping the recipe's data, schedule, head and
runtime and taking the row's backbone.
"""
import ast
import copy
import glob
import os.path as osp
from typing import List

from mmengine.config import Config

from convneur_mm.utils.paths import config_dir

ABLATION_DIR = 'ablations'


def ablation_configs() -> List[str]:
    """Paths of the Table 5 row configs, in the paper's row order."""
    paths = glob.glob(osp.join(config_dir(), ABLATION_DIR, '*.py'))
    return sorted(paths, key=lambda p: (_literal_table5(p).get('order', 1000), p))


def _literal_table5(path: str) -> dict:
    """The ``table5 = dict(...)`` of a config file, read without loading its
    bases (seconds each: they import the toolboxes)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], 'id', None) == 'table5'
                and isinstance(node.value, ast.Call)):
            return {kw.arg: ast.literal_eval(kw.value) for kw in node.value.keywords}
    return {}


def row_meta(cfg: Config) -> dict:
    """The row's ``table5`` entry; a config without one is a row of its own,
    named after nothing but its global-branch settings."""
    meta = dict(cfg.get('table5') or {})
    if not meta:
        backbone = cfg.model.backbone
        meta = dict(order=1000, experiment='-', variant='-', paper_gflops=None,
                    paper_top1=None, method=f'{backbone.get("global_mixer", "memory")}, '
                    f'{backbone.get("memory_placement", "stage")}, '
                    f'{backbone.get("fusion", "gate")}')
    return meta


def _merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def apply_recipe(row: Config, recipe: Config) -> Config:
    """``recipe`` with ``row``'s backbone (and the head width it needs).

    A recipe may set ``backbone_overrides`` (e.g. a smaller ``arch`` for the
    probe's resolution); they are merged into every row's backbone, so that
    each row still differs from the others by its own switch only.
    """
    from convneur_mm.models import ConvNeur
    merged = copy.deepcopy(recipe)
    backbone = copy.deepcopy(row.model.backbone.to_dict())
    _merge(backbone, recipe.get('backbone_overrides', {}))
    merged.model.backbone = backbone
    merged.model.head.in_channels = ConvNeur._parse_arch(backbone['arch'])['dims'][-1]
    merged.table5 = row_meta(row)
    return merged
