"""The tiny synthetic COCO: deterministic, in the real format (pycocotools'
loader and evaluator, MMDetection's CocoDataset), and learnable."""
import filecmp
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from convneur_mm.demo_data.coco import (CATEGORIES, CLASSES, IMAGE_SHAPE, ann_file,
                                        generate_coco_tiny, image_dir)

NUM_TRAIN, NUM_VAL = 12, 6


@pytest.fixture(scope='module')
def tiny_coco(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('coco_tiny'))
    generate_coco_tiny(root, num_train=NUM_TRAIN, num_val=NUM_VAL)
    return root


def _files(root: str):
    return sorted(osp.relpath(osp.join(d, f), root) for d, _, files in os.walk(root)
                  for f in files)


def test_generation_is_deterministic_and_split_size_independent(tiny_coco, tmp_path):
    again = str(tmp_path / 'again')
    generate_coco_tiny(again, num_train=NUM_TRAIN, num_val=NUM_VAL)
    files = _files(tiny_coco)
    assert files == _files(again)
    assert len(files) == 2 + NUM_TRAIN + NUM_VAL
    match, mismatch, errors = filecmp.cmpfiles(tiny_coco, again, files, shallow=False)
    assert not mismatch and not errors
    # a longer train split starts with the same images
    longer = str(tmp_path / 'longer')
    generate_coco_tiny(longer, num_train=NUM_TRAIN + 3, num_val=NUM_VAL)
    first = [f'train2017/{i:012d}.jpg' for i in range(1, NUM_TRAIN + 1)]
    assert filecmp.cmpfiles(tiny_coco, longer, first, shallow=False)[0] == first
    other_seed = str(tmp_path / 'seed1')
    generate_coco_tiny(other_seed, num_train=2, num_val=2, seed=1)
    assert not filecmp.cmp(osp.join(tiny_coco, 'train2017', f'{2:012d}.jpg'),
                           osp.join(other_seed, 'train2017', f'{2:012d}.jpg'), shallow=False)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_pycocotools_reads_every_annotation_kind(tiny_coco, split):
    coco = COCO(ann_file(tiny_coco, split))
    assert [(c['name'], c['id']) for c in coco.loadCats(coco.getCatIds())] == \
        [(name, cid) for name, cid, _ in CATEGORIES]
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == (NUM_TRAIN if split == 'train' else NUM_VAL)
    assert any(not coco.getAnnIds(imgIds=img['id']) for img in images)  # no objects
    anns = coco.loadAnns(coco.getAnnIds())
    kinds = {('crowd' if a['iscrowd'] else 'polygon' if isinstance(a['segmentation'], list)
              else 'rle') for a in anns}
    assert kinds == {'crowd', 'polygon', 'rle'}
    crowds = [a for a in anns if a['iscrowd']]
    assert len(crowds) == 1 and isinstance(crowds[0]['segmentation']['counts'], list)
    for a in anns:
        if not a['iscrowd'] and isinstance(a['segmentation'], dict):
            assert isinstance(a['segmentation']['counts'], str)  # compressed
    used = {a['category_id'] for a in anns if not a['iscrowd']}
    assert len(used) >= 3
    for img in images:
        assert (img['height'], img['width']) == IMAGE_SHAPE
        pixels = cv2.imread(osp.join(image_dir(tiny_coco, split), img['file_name']))
        assert pixels is not None and pixels.shape == (*IMAGE_SHAPE, 3)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img['id'])):
            mask = coco.annToMask(a)
            assert mask.sum() == a['area'] > 0
            rle = mask_utils.encode(np.asfortranarray(mask))
            assert mask_utils.toBbox(rle).tolist() == a['bbox']
            if not a['iscrowd']:
                # learnable: the object is painted in its category's colour
                colour = dict((cid, rgb) for _, cid, rgb in CATEGORIES)[a['category_id']]
                mean_rgb = pixels[mask.astype(bool)][:, ::-1].mean(0)
                assert np.abs(mean_rgb - colour).max() < 40
                assert 32 ** 2 * 0.3 < a['area'] < 72 ** 2  # a 32-px triangle: 0.32 x 32^2


def test_ids_are_unique_across_splits(tiny_coco):
    contents = [json.load(open(ann_file(tiny_coco, s))) for s in ('train', 'val')]
    image_ids = [img['id'] for c in contents for img in c['images']]
    ann_ids = [a['id'] for c in contents for a in c['annotations']]
    assert len(set(image_ids)) == len(image_ids)
    assert len(set(ann_ids)) == len(ann_ids)


def test_cocoeval_scores_the_ground_truth_as_perfect(tiny_coco):
    """pycocotools' evaluator, fed the annotations as detections, gives AP 1:
    boxes, masks, crowd handling and the empty image are consistent."""
    gt = COCO(ann_file(tiny_coco, 'val'))
    results = [dict(image_id=a['image_id'], category_id=a['category_id'], bbox=a['bbox'],
                    segmentation=gt.annToRLE(a), score=1.0)
               for a in gt.loadAnns(gt.getAnnIds()) if not a['iscrowd']]
    for rle in (r['segmentation'] for r in results):
        rle['counts'] = rle['counts'].decode('ascii') if isinstance(rle['counts'], bytes) \
            else rle['counts']
    detections = gt.loadRes(results)
    for iou_type in ('bbox', 'segm'):
        evaluator = COCOeval(gt, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0)


def test_mmdet_coco_dataset_loads_it_with_the_demo_metainfo(tiny_coco):
    from mmengine.registry import init_default_scope
    from mmdet.registry import DATASETS

    from convneur_mm.apis.launch import load_config
    from convneur_mm.utils.paths import config_path
    cfg = load_config(config_path('demo/cascade_rcnn_convneur_m3_coco_tiny.py'))
    assert tuple(cfg.metainfo['classes']) == CLASSES
    assert [tuple(c) for c in cfg.metainfo['palette']] == [rgb for _, _, rgb in CATEGORIES]
    init_default_scope('mmdet')
    train = DATASETS.build(dict(cfg.train_dataloader.dataset, data_root=tiny_coco))
    val = DATASETS.build(dict(cfg.test_dataloader.dataset, data_root=tiny_coco))
    assert len(train) == NUM_TRAIN - 1  # the image without objects is filtered out
    assert len(val) == NUM_VAL
    assert train.cat_ids == [cid for _, cid, _ in CATEGORIES]
    crowd = train.get_data_info(0)  # image 2 of the generator: the crowd region
    assert [i['ignore_flag'] for i in crowd['instances']].count(1) == 1
    sample = train[0]
    instances = sample['data_samples'].gt_instances
    assert tuple(sample['inputs'].shape) == (3, *IMAGE_SHAPE)  # no resize, no padding
    assert instances.masks.masks.shape[1:] == IMAGE_SHAPE
    assert len(instances) == len(instances.masks) == len(instances.labels) >= 1
    assert set(instances.labels.tolist()) <= set(range(len(CLASSES)))


def test_command_line_entry_point(tmp_path):
    out = str(tmp_path / 'cli')
    result = subprocess.run([sys.executable, '-m', 'convneur_mm.demo_data.coco', out,
                             '--num-train', '2', '--num-val', '2'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert osp.isfile(ann_file(out, 'val')) and ann_file(out, 'train') in result.stdout
    with pytest.raises(ValueError, match='at least 2 images'):
        generate_coco_tiny(str(tmp_path / 'bad'), num_train=1)
