"""A tiny, deterministic instance-segmentation dataset in the real COCO format.

There is no COCO on a fresh machine, yet the detection demo and tests must
train and evaluate the real Cascade Mask R-CNN config end to end. This writes,
in seconds, what ``CocoDataset`` and pycocotools read from COCO 2017::

    OUT_DIR/annotations/instances_{train,val}2017.json
    OUT_DIR/{train,val}2017/000000000001.jpg ...

Objects are large flat-coloured shapes, one colour and shape per category, so
that a detector trained from scratch learns them in minutes. The files also
carry what real COCO files carry and loaders must cope with: category ids with
gaps, polygon masks, compressed RLE masks (the rings, whose hole a polygon
cannot express), a crowd region with an uncompressed RLE mask, an image with
no objects.

All images are 160x128: a multiple of 32 in both sides and one orientation, so
that no batch is ever padded (see IMAGE_SHAPE).

    python -m convneur_mm.demo_data.coco data/coco_tiny/
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .cli import generator_main

# name, COCO-style id (with gaps, as COCO's have), RGB colour
CATEGORIES: Tuple[Tuple[str, int, Tuple[int, int, int]], ...] = (
    ('disc', 1, (220, 40, 40)),
    ('square', 2, (40, 190, 60)),
    ('triangle', 4, (50, 80, 230)),
    ('ring', 7, (235, 200, 30)),
)
CLASSES = tuple(name for name, _, _ in CATEGORIES)
PALETTE = [colour for _, _, colour in CATEGORIES]
SPLITS = ('train', 'val')
# (H, W). Zero padding (DetDataPreprocessor pads batches to a multiple of 32 and
# AspectRatioBatchSampler mixes orientations at an epoch's end) slows a
# randomly initialised ConvNeur down: its LayerNorms see all-zero vectors
# there and scale gradients by 1/sqrt(eps). Measured on the demo: batches
# padded from 160 to 192 px wide end epoch 3 at loss 3.40 instead of 2.20.
IMAGE_SHAPE = (128, 160)
SIZE_RANGE = (32, 72)  # object diameter in pixels: at least the smallest anchor (32)


def ann_file(root: str, split: str) -> str:
    """Where the annotations of ``split`` ('train' or 'val') are, as in COCO 2017."""
    return osp.join(root, 'annotations', f'instances_{split}2017.json')


def image_dir(root: str, split: str) -> str:
    return osp.join(root, f'{split}2017')


def _background(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """Dark grey with a brightness ramp: varied, yet never mistaken for an object.

    The hue barely varies on purpose: ConvNeur's first LayerNorm scales every
    pixel's features to unit variance, so a background of random hues would
    be as loud as the objects and slow a from-scratch model down.
    """
    h, w = shape
    level0, level1 = rng.uniform(40, 100, size=2)
    tint = rng.uniform(-6, 6, size=3)
    horizontal = rng.random() < 0.5
    t = np.linspace(0, 1, w if horizontal else h)[:, None]
    ramp = level0 * (1 - t) + level1 * t + tint
    ramp = ramp[None] if horizontal else ramp[:, None]
    return np.broadcast_to(ramp, (h, w, 3)).astype(np.float32)


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> List[float]:
    """Vertices (x0, y0, x1, y1, ...) of a disc (24-gon), square or triangle."""
    corners = {'disc': 24, 'square': 4, 'triangle': 3}[kind]
    theta = angle + np.arange(corners) * 2 * np.pi / corners
    points = np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], 1)
    return np.round(points, 1).ravel().tolist()


def _shape_mask(kind: str, shape: Tuple[int, int], cx: float, cy: float, radius: float,
                rng: np.random.Generator) -> Tuple[np.ndarray, Optional[List[float]]]:
    """The object's binary mask and, unless it has a hole, its polygon.

    Polygons are rasterized by pycocotools itself, so that the painted pixels,
    the area and the box are exactly what the evaluator decodes.
    """
    h, w = shape
    if kind == 'ring':
        mask = np.zeros(shape, np.uint8)
        centre = (int(round(cx)), int(round(cy)))
        cv2.circle(mask, centre, int(radius), 1, thickness=-1)
        cv2.circle(mask, centre, int(radius * 0.5), 0, thickness=-1)
        return mask, None
    polygon = _polygon(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi))
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w)))
    return mask, polygon


def _annotation(mask: np.ndarray, segmentation, category_id: int, crowd: bool) -> dict:
    """COCO's area and bbox are those of the mask, as in the official files."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return dict(category_id=category_id, segmentation=segmentation,
                area=float(mask_utils.area(rle)), bbox=[x, y, w, h], iscrowd=int(crowd))


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Run lengths in column-major order, starting with a zero run (COCO's crowd format)."""
    flat = np.asfortranarray(mask).ravel(order='F')
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return dict(counts=counts, size=list(mask.shape))


def _place(rng: np.random.Generator, shape: Tuple[int, int], radius: float,
           taken: List[Tuple[float, float, float]]) -> Optional[Tuple[float, float]]:
    """A centre whose circle of ``radius`` is inside the image and clear of the others."""
    h, w = shape
    for _ in range(50):
        cx, cy = rng.uniform(radius + 2, w - radius - 2), rng.uniform(radius + 2, h - radius - 2)
        if all(np.hypot(cx - x, cy - y) > radius + r + 4 for x, y, r in taken):
            return cx, cy
    return None


def _crowd(rng: np.random.Generator, shape: Tuple[int, int],
           taken: List[Tuple[float, float, float]]) -> Optional[np.ndarray]:
    """A cluster of small discs, annotated as one crowd region like COCO's."""
    radius = 20.0
    centre = _place(rng, shape, radius, taken)
    if centre is None:
        return None
    taken.append((*centre, radius))
    mask = np.zeros(shape, np.uint8)
    for _ in range(7):
        x, y = np.asarray(centre) + rng.uniform(-radius + 5, radius - 5, size=2)
        cv2.circle(mask, (int(round(x)), int(round(y))), int(rng.uniform(3, 5)), 1, -1)
    return mask


def _make_image(rng: np.random.Generator, shape: Tuple[int, int], num_objects: int,
                with_crowd: bool) -> Tuple[np.ndarray, List[dict]]:
    """One RGB image and its annotations (without ids); an object that finds no
    free place is left out."""
    img = _background(rng, shape)
    anns, taken = [], []
    if with_crowd:
        mask = _crowd(rng, shape, taken)
        if mask is not None:
            img[mask.astype(bool)] = CATEGORIES[0][2]
            anns.append(_annotation(mask, _uncompressed_rle(mask), CATEGORIES[0][1], True))
    for _ in range(num_objects):
        name, category_id, colour = CATEGORIES[rng.integers(len(CATEGORIES))]
        radius = rng.uniform(*SIZE_RANGE) / 2
        centre = _place(rng, shape, radius, taken)
        if centre is None:
            continue
        taken.append((*centre, radius))
        mask, polygon = _shape_mask(name, shape, *centre, radius, rng)
        shade = np.clip(np.asarray(colour) + rng.uniform(-25, 25, 3), 0, 255)
        img[mask.astype(bool)] = shade
        if polygon is None:  # compressed RLE, as JSON needs it: counts as str
            rle = mask_utils.encode(np.asfortranarray(mask))
            segmentation = dict(size=rle['size'], counts=rle['counts'].decode('ascii'))
        else:
            segmentation = [polygon]
        anns.append(_annotation(mask, segmentation, category_id, False))
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), anns


def _write_split(root: str, split: str, num_images: int, seed: int,
                 first_image_id: int) -> str:
    """Images and the annotation file of one split; returns the file's path."""
    os.makedirs(image_dir(root, split), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = first_image_id + index
        # one generator per image: the first N images do not depend on the split size
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        shape = IMAGE_SHAPE
        num_objects = 0 if index == 0 else int(rng.integers(1, 5))  # image 0: no objects
        img, anns = _make_image(rng, shape, num_objects, with_crowd=index == 1)
        file_name = f'{image_id:012d}.jpg'
        cv2.imwrite(osp.join(image_dir(root, split), file_name), img[..., ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append(dict(id=image_id, file_name=file_name, height=shape[0],
                           width=shape[1], license=1))
        # ids unique across splits, as in COCO (an image has at most 4 annotations)
        annotations += [dict(ann, id=image_id * 10 + k, image_id=image_id)
                        for k, ann in enumerate(anns)]
    categories = [dict(id=cid, name=name, supercategory='shape')
                  for name, cid, _ in CATEGORIES]
    content = dict(
        info=dict(description='ConvNeur-MM tiny COCO (synthetic shapes)', version='1.0',
                  year=2026, contributor='convneur_mm.demo_data.coco', date_created=''),
        licenses=[dict(id=1, name='CC0 1.0', url='')],
        images=images, annotations=annotations, categories=categories)
    path = ann_file(root, split)
    os.makedirs(osp.dirname(path), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(content, f)
    os.replace(tmp, path)  # the annotation file appears only when the split is complete
    return path


def generate_coco_tiny(out_dir: str, num_train: int = 96, num_val: int = 32,
                       seed: int = 0) -> Dict[str, str]:
    """Write the tiny dataset under ``out_dir``; returns {split: annotation file}.

    The same arguments always give the same files (byte-identical JSON; the
    JPEGs as deterministic as the installed libjpeg). Both splits need at
    least two images: the first has no objects, the second a crowd region.
    """
    if num_train < 2 or num_val < 2:
        raise ValueError(f'need at least 2 images per split, got train={num_train}, '
                         f'val={num_val}')
    counts = dict(train=num_train, val=num_val)
    # image ids unique across splits, as in COCO
    first_ids = dict(train=1, val=num_train + 1)
    return {split: _write_split(out_dir, split, counts[split], seed, first_ids[split])
            for split in SPLITS}


def main(argv: Optional[List[str]] = None) -> None:
    generator_main(generate_coco_tiny, argv)


if __name__ == '__main__':
    main()
