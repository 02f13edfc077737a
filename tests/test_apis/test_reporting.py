import os.path as osp

import pytest

from convneur_mm.apis.launch import load_config
from convneur_mm.apis.reporting import enable_visualization, format_metrics
from tests.markdown import table_rows
from tests.paths import REPO


def test_coco_table_in_the_papers_layout_with_empty_size_ranges_as_dashes():
    metrics = {f'coco/bbox_{k}': v for k, v in zip(
        ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l'),
        (0.5, 0.75, 0.5, 0.25, 0.6, -1.0))}  # no large object: pycocotools says -1
    metrics['coco/bbox_mAP_copypaste'] = '0.500 ...'
    metrics['coco/segm_mAP'] = 0.4  # an incomplete row stays a plain metric
    table = format_metrics(metrics, title='demo')
    rows = table_rows(table)
    assert rows[:2] == [('task', 'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'),
                        ('bbox', '50.0', '75.0', '50.0', '25.0', '60.0', '-')]
    assert ('coco/segm_mAP', '0.4000') in rows
    assert 'copypaste' not in table and '-100' not in table


@pytest.mark.parametrize('config, hook, interval_key', [
    ('demo/fpn_convneur_m2_ade20k_tiny.py', 'SegVisualizationHook', 'interval'),
    ('demo/cls_convneur_m1_imagenet_tiny.py', 'VisualizationHook', 'interval'),
    ('demo/cascade_rcnn_convneur_m3_coco_tiny.py', 'DetVisualizationHook', None),
])
def test_show_dir_draws_every_nth_image(config, hook, interval_key, tmp_path):
    cfg = load_config(osp.join(REPO, 'configs', config), work_dir=str(tmp_path))
    enable_visualization(cfg, str(tmp_path / 'drawn'), show=False, wait_time=0, interval=3)
    settings = cfg.default_hooks.visualization
    assert settings.type.endswith(hook)
    if interval_key:  # MMDetection's hook draws every test image whatever its interval
        assert settings[interval_key] == 3
    with pytest.raises(ValueError, match='--show-interval must be at least 1, got 0'):
        enable_visualization(cfg, None, show=True, wait_time=0, interval=0)
