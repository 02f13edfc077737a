from convneur_mm.engine.reporting import format_metrics


def test_coco_table_in_the_papers_layout_with_empty_size_ranges_as_dashes():
    metrics = {f'coco/bbox_{k}': v for k, v in zip(
        ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l'),
        (0.5, 0.75, 0.5, 0.25, 0.6, -1.0))}  # no large object: pycocotools says -1
    metrics['coco/bbox_mAP_copypaste'] = '0.500 ...'
    metrics['coco/segm_mAP'] = 0.4  # an incomplete row stays a plain metric
    table = format_metrics(metrics, title='demo')
    assert '| bbox | 50.0 | 75.0 | 50.0 | 25.0 | 60.0 | - |' in table
    assert '| coco/segm_mAP | 0.4000 |' in table
    assert 'copypaste' not in table and '-100' not in table
