"""BucketPad: a detection batch padded up to a few sizes, so that a compiled
backbone meets few shapes (docs/notes/investigations.md)."""
import numpy as np
import pytest
import torch
from mmcv.image import rescale_size

from convneur_mm.models.data_preprocessors import BucketPad, bucket_side

COCO_BUCKETS = (800, 1088, 1344)


def test_bucket_side_is_the_smallest_bucket_that_holds_the_size():
    assert [bucket_side(s, (1344, 800, 1088)) for s in (1, 800, 801, 1088, 1344)] == \
        [800, 800, 1088, 1088, 1344]
    assert bucket_side(1400, COCO_BUCKETS) == 1400  # above every bucket: kept, never cropped


@pytest.mark.parametrize('buckets', [(), (800, 0), (800.5, ), (True, )])
def test_bad_buckets_are_refused(buckets):
    with pytest.raises(ValueError, match='positive integers'):
        BucketPad(buckets)


def padded_shapes(buckets, ratio_range):
    """The distinct batch shapes COCO's training meets: images with a long side
    of 640 (COCO's) and every short side whose aspect ratio is in range,
    resized keep-ratio to 1333x800 (mmcv's rescale_size, as mmdet's Resize),
    padded to a multiple of 32 (DetDataPreprocessor), then to the buckets."""
    pad = BucketPad(buckets) if buckets else None
    shapes = set()
    for short in range(1, 641):
        for w, h in ((640, short), (short, 640)):
            if not 1 / ratio_range <= w / h <= ratio_range:
                continue
            nw, nh = rescale_size((w, h), (1333, 800))
            ph, pw = -(-nh // 32) * 32, -(-nw // 32) * 32
            shapes.add(pad.target_shape(ph, pw) if pad else (ph, pw))
    return shapes


@pytest.mark.torch_pinned
@pytest.mark.parametrize('ratio_range,unbucketed', [(4 / 3, 19), (16 / 9, 37), (3, 57)])
def test_coco_sizes_fit_the_recompile_limit(ratio_range, unbucketed):
    assert len(padded_shapes(None, ratio_range)) == unbucketed  # docs/notes/investigations.md counts
    shapes = padded_shapes(COCO_BUCKETS, ratio_range)
    assert len(shapes) <= 5 < torch._dynamo.config.recompile_limit
    assert all(h in COCO_BUCKETS and w in COCO_BUCKETS for h, w in shapes)


def test_images_masks_and_metainfo_are_padded_to_the_bucket():
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    inputs = torch.rand(2, 3, 96, 130)
    samples = []
    for _ in range(2):
        sample = DetDataSample(metainfo=dict(batch_input_shape=(96, 130), pad_shape=(96, 130)))
        sample.gt_instances = InstanceData(
            masks=BitmapMasks(np.ones((1, 96, 130), dtype=np.uint8), 96, 130))
        samples.append(sample)
    out, samples = BucketPad((64, 128, 160))(inputs, samples)
    assert out.shape == (2, 3, 128, 160)
    assert torch.equal(out[..., :96, :130], inputs) and not out[..., 96:, :].any()
    for sample in samples:
        assert sample.batch_input_shape == sample.pad_shape == (128, 160)
        masks = sample.gt_instances.masks
        assert (masks.height, masks.width) == (128, 160) and masks.masks[:, :96, :130].all()
        assert not masks.masks[:, 96:].any()
