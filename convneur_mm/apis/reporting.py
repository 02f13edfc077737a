"""Evaluation output: a metrics table and the toolboxes' visualization hooks."""
from typing import List, Optional, Set, Tuple

from mmengine.config import Config

from convneur_mm.utils.tables import markdown_table

# metric key suffix -> column, in the order of the paper's tables
COCO_COLUMNS = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')
COCO_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def _coco_cell(value: float) -> str:
    """pycocotools reports -1 where a size range has no objects: show '-'."""
    return '-' if value < 0 else f'{100 * value:.1f}'


def _coco_rows(metrics: dict) -> Tuple[List[List[str]], Set[str]]:
    """Rows of the COCO table and the metric keys they show."""
    rows, used = [], set()
    for task in ('bbox', 'segm'):
        keys = [f'coco/{task}_{c}' for c in COCO_COLUMNS]
        if all(k in metrics for k in keys):
            rows.append([task] + [_coco_cell(metrics[k]) for k in keys])
            used.update(keys)
    return rows, used


def format_metrics(metrics: dict, title: str = '') -> str:
    """A Markdown table of evaluation metrics (COCO gets the paper's layout)."""
    tables = [f'## {title}'] if title else []
    rows, used = _coco_rows(metrics)
    if rows:
        tables.append(markdown_table(('task', ) + COCO_NAMES, rows))
    rest = {k: v for k, v in metrics.items()
            if k not in used and not k.endswith('copypaste')}
    if rest:
        tables.append(markdown_table(('metric', 'value'), [
            (k, f'{v:.4f}' if isinstance(v, float) else v) for k, v in rest.items()]))
    return '\n\n'.join(tables)


def enable_visualization(cfg: Config, show_dir: Optional[str], show: bool,
                         wait_time: float, interval: int = 1) -> None:
    """Turn on the toolbox's visualization hook the way its own test.py does,
    drawing every ``interval``-th test image: MMSegmentation's hook draws
    every 50th by default and MMPretrain's every 5000th, so that ``--show-dir``
    on a small set wrote nothing (MMDetection's draws every test image)."""
    if interval < 1:  # MMSegmentation's hook would draw nothing, MMPretrain's divide by 0
        raise ValueError(f'--show-interval must be at least 1, got {interval}')
    hooks = cfg.get('default_hooks', {})
    hook = hooks.get('visualization')
    if hook is None:
        raise RuntimeError('the config has no default_hooks.visualization to draw with')
    kind = hook['type'].split('.')[-1]
    if kind == 'VisualizationHook':  # MMPretrain
        hook.update(enable=True, show=show, wait_time=wait_time, interval=interval)
        if show_dir:
            hook['out_dir'] = show_dir
    else:  # DetVisualizationHook, SegVisualizationHook
        hook.update(draw=True, show=show, wait_time=wait_time)
        if kind == 'SegVisualizationHook':  # per batch: of one image in test configs
            hook['interval'] = interval
        if show_dir and kind == 'DetVisualizationHook':
            hook['test_out_dir'] = show_dir
        elif show_dir:
            cfg.visualizer['save_dir'] = show_dir
