"""``tools/test.py --out``: predictions in a pickle, without what makes it huge.

MMEngine's ``DumpResults`` keeps each data sample as it is: for segmentation
the full-resolution logits (150 x H x W floats) and the ground truth, for
detection every mask as a dense boolean array, which adds up to hundreds of GB
on ADE20K or COCO val. Detection uses MMDetection's ``DumpDetResults`` (masks
as RLE, no ground truth); segmentation keeps the label map and the image's
meta data only.
"""
from typing import Sequence

import numpy as np
from mmengine.evaluator import BaseMetric, DumpResults

# segmentation data-sample keys that are not the prediction's label map
SEG_HEAVY_KEYS = ('seg_logits', 'gt_sem_seg', 'gt_depth_map', 'gt_edge_map')


class DumpSegResults(DumpResults):
    """Dump each image's predicted label map (smallest integer dtype) and meta."""

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        """``data_samples``: the Evaluator's dicts of ``SegDataSample``s."""
        for sample in data_samples:
            kept = {k: v for k, v in sample.items()
                    if k not in SEG_HEAVY_KEYS and k != 'pred_sem_seg'}
            if 'pred_sem_seg' in sample:
                labels = sample['pred_sem_seg']['data'].squeeze(0).cpu().numpy()
                dtype = np.uint8 if labels.max(initial=0) < 256 else np.int32
                kept['pred_sem_seg'] = labels.astype(dtype)
            self.results.append(kept)


def prediction_dumper(scope: str, out_file: str) -> BaseMetric:
    """The dump metric for a config of toolbox ``scope`` (its default_scope)."""
    if scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        return DumpDetResults(out_file_path=out_file)
    if scope == 'mmseg':
        return DumpSegResults(out_file_path=out_file)
    return DumpResults(out_file_path=out_file)
