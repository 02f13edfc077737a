"""A tiny, deterministic scene-parsing dataset in the real ADE20K layout.

There is no ADE20K on a fresh machine, yet the segmentation demo and tests must
train and evaluate the real Semantic FPN config end to end. This writes, in
seconds, what ``ADE20KDataset`` reads from ADEChallengeData2016::

    OUT_DIR/images/{training,validation}/ADE_{train,val}_00000001.jpg
    OUT_DIR/annotations/{training,validation}/ADE_{train,val}_00000001.png
    OUT_DIR/sceneCategories.txt   (written last: its presence means complete)

Label PNGs are single-channel and hold ADE20K's own ids: 0 is "other"
(unlabelled; ``reduce_zero_label`` turns it into the ignore index 255) and
1..150 are the 150 classes, so a pixel of id k is class k - 1 of
``ADE20KDataset.METAINFO``. Street scenes use six of those classes, each with
its own colour and texture so that a model trained from scratch learns them in
minutes; clutter patches of random colour are labelled 0, as ADE20K leaves
unannotated pixels.

    python -m convneur_mm.demo_data.ade20k data/ade20k_tiny/
"""
import os
import os.path as osp
import re
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np

from .cli import generator_main

Shape = Tuple[int, int]  # (H, W)

OTHER = 0
BUILDING, SKY, TREE, ROAD, GRASS, CAR = 2, 3, 5, 7, 10, 21
# ADE20K id -> its name in ADE20KDataset.METAINFO['classes'][id - 1]
CLASSES: Dict[int, str] = {BUILDING: 'building', SKY: 'sky', TREE: 'tree', ROAD: 'road',
                           GRASS: 'grass', CAR: 'car'}
SPLITS = {'training': 'train', 'validation': 'val'}  # folder -> ADE20K file-name part
LANDSCAPE, PORTRAIT = (192, 256), (256, 192)


def image_dir(root: str, split: str) -> str:
    """Images of ``split`` ('training' or 'validation'), as in ADEChallengeData2016."""
    return osp.join(root, 'images', split)


def annotation_dir(root: str, split: str) -> str:
    return osp.join(root, 'annotations', split)


# ------------------------------------------------------------------ textures
def _smooth_noise(rng: np.random.Generator, shape: Shape, cells: Shape) -> np.ndarray:
    """Noise in [-1, 1] varying on a ``cells`` grid (blotches or streaks)."""
    coarse = rng.uniform(-1, 1, cells).astype(np.float32)
    return cv2.resize(coarse, shape[::-1], interpolation=cv2.INTER_CUBIC).clip(-1, 1)


def _solid(colour, shape: Shape) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.float32), (*shape, 3)).copy()


def _sky(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Smooth vertical gradient from deep to pale blue."""
    top = np.array([80, 140, 225]) + rng.uniform(-15, 15, 3)
    bottom = np.array([185, 210, 245]) + rng.uniform(-10, 10, 3)
    t = np.linspace(0, 1, shape[0], dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (*shape, 3)).astype(np.float32)


def _building(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Beige-grey facade with a regular grid of dark windows."""
    tex = _solid(np.array([165, 150, 130]) + rng.uniform(-20, 20, 3), shape)
    period = int(rng.integers(10, 15))
    ys, xs = np.mgrid[:shape[0], :shape[1]]
    windows = (ys % period < period * 0.55) & (xs % period < period * 0.5)
    tex[windows] = np.array([55, 60, 75]) + rng.uniform(-10, 10, 3)
    return tex


def _tree(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Dark green foliage with light and dark blotches."""
    tex = _solid(np.array([35, 95, 40]) + rng.uniform(-10, 10, 3), shape)
    blotches = _smooth_noise(rng, shape, (shape[0] // 6, shape[1] // 6))
    return tex + 40 * blotches[..., None] * np.array([0.6, 1.0, 0.5], np.float32)


def _grass(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Yellow-green with fine vertical streaks."""
    tex = _solid(np.array([120, 175, 55]) + rng.uniform(-12, 12, 3), shape)
    streaks = _smooth_noise(rng, shape, (max(shape[0] // 24, 2), shape[1] // 2))
    return tex + 30 * streaks[..., None]


def _road(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Dark asphalt; the lane marking is painted by ``_draw_road``."""
    return _solid(np.array([78, 78, 84]) + rng.uniform(-8, 8), shape)


def _car(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Saturated red paint; windows and wheels are painted by ``_draw_car``."""
    return _solid(np.array([205, 35, 35]) + rng.uniform(-25, 25, 3), shape)


def _clutter(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Anything else: a random colour with strong noise (labelled 0, ignored)."""
    return _solid(rng.uniform(0, 255, 3), shape) + rng.normal(0, 30, (*shape, 3))


TEXTURES: Dict[int, Callable[[np.random.Generator, Shape], np.ndarray]] = {
    SKY: _sky, BUILDING: _building, TREE: _tree, GRASS: _grass, ROAD: _road, CAR: _car,
    OTHER: _clutter}


# ------------------------------------------------------------------- layout
class _Canvas:
    """An image and its label map, painted region by region (later on top)."""

    def __init__(self, rng: np.random.Generator, shape: Shape):
        self.rng, self.shape = rng, shape
        self.img = np.zeros((*shape, 3), np.float32)
        self.label = np.zeros(shape, np.uint8)
        self._textures: Dict[int, np.ndarray] = {}

    def paint(self, mask: np.ndarray, class_id: int) -> None:
        mask = mask.astype(bool)
        if class_id not in self._textures or class_id == OTHER:  # clutter: new colour each
            self._textures[class_id] = TEXTURES[class_id](self.rng, self.shape)
        self.img[mask] = self._textures[class_id][mask]
        self.label[mask] = class_id

    def blank(self) -> np.ndarray:
        return np.zeros(self.shape, np.uint8)


def _draw_buildings(c: _Canvas, horizon: int) -> None:
    h, w = c.shape
    for _ in range(int(c.rng.integers(0, 3))):
        x0 = int(c.rng.uniform(-0.1, 0.8) * w)
        width = int(c.rng.uniform(0.2, 0.45) * w)
        top = int(horizon * c.rng.uniform(0.1, 0.6))
        mask = c.blank()
        mask[top:horizon, max(x0, 0):min(x0 + width, w)] = 1
        c.paint(mask, BUILDING)


def _draw_trees(c: _Canvas, horizon: int) -> None:
    h, w = c.shape
    for _ in range(int(c.rng.integers(0, 4))):
        mask = c.blank()
        centre = (int(c.rng.uniform(0, w)), int(horizon - c.rng.uniform(0, 0.15) * h))
        axes = (int(c.rng.uniform(0.06, 0.14) * w), int(c.rng.uniform(0.1, 0.2) * h))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, thickness=-1)
        c.paint(mask, TREE)


def _draw_road(c: _Canvas, horizon: int) -> np.ndarray:
    """A road narrowing towards the horizon; returns its mask."""
    h, w = c.shape
    centre_far = c.rng.uniform(0.35, 0.65) * w
    centre_near = c.rng.uniform(0.3, 0.7) * w
    half_far, half_near = c.rng.uniform(0.03, 0.08) * w, c.rng.uniform(0.3, 0.5) * w
    corners = np.array([[centre_far - half_far, horizon], [centre_far + half_far, horizon],
                        [centre_near + half_near, h], [centre_near - half_near, h]])
    mask = c.blank()
    cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    c.paint(mask, ROAD)
    # a dashed white centre line, labelled road as in ADE20K
    for t in np.arange(0.1, 1.0, 0.2):
        ends = [(int(round(centre_far + (centre_near - centre_far) * s)),
                 int(round(horizon + (h - horizon) * s))) for s in (t, t + 0.08)]
        cv2.line(c.img, *ends, (235, 235, 225), thickness=max(1, int(2 + 3 * t)))
    return mask


def _draw_cars(c: _Canvas, road: np.ndarray, horizon: int) -> None:
    """Up to two red cars standing on the nearer two thirds of the road."""
    h, w = c.shape
    near = horizon + (h - horizon) // 3
    ys, xs = np.nonzero(road[near:])
    if len(ys) == 0:
        return
    for _ in range(int(c.rng.integers(0, 3))):
        k = int(c.rng.integers(len(ys)))
        cy, cx = ys[k] + near, xs[k]
        scale = 0.5 + (cy - horizon) / max(h - horizon, 1)  # nearer is larger
        cw, ch = int(0.16 * w * scale), int(0.07 * h * scale)
        x0, y0 = int(cx - cw / 2), int(cy - ch)
        body = c.blank()
        cv2.rectangle(body, (x0, y0), (x0 + cw, cy), 1, thickness=-1)
        cv2.rectangle(body, (x0 + cw // 5, y0 - ch // 2), (x0 + 4 * cw // 5, y0), 1, -1)
        for wx in (x0 + cw // 5, x0 + 4 * cw // 5):  # wheels
            cv2.circle(body, (wx, cy), max(ch // 3, 1), 1, thickness=-1)
        c.paint(body, CAR)
        glass = c.blank()
        cv2.rectangle(glass, (x0 + cw // 4, y0 - ch // 3), (x0 + 3 * cw // 4, y0), 1, -1)
        c.img[glass.astype(bool)] = (60, 70, 90)
        for wx in (x0 + cw // 5, x0 + 4 * cw // 5):
            cv2.circle(c.img, (wx, cy), max(ch // 3, 1), (25, 25, 25), thickness=-1)


def _draw_clutter(c: _Canvas) -> None:
    h, w = c.shape
    for _ in range(int(c.rng.integers(0, 3))):
        mask = c.blank()
        points = np.stack([c.rng.uniform(0, w, 3), c.rng.uniform(0, h, 3)], 1)
        points = points.mean(0) + (points - points.mean(0)) * c.rng.uniform(0.1, 0.3)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
        c.paint(mask, OTHER)


def make_scene(rng: np.random.Generator, shape: Shape) -> Tuple[np.ndarray, np.ndarray]:
    """One RGB street scene (uint8) and its ADE20K-id label map (uint8)."""
    c = _Canvas(rng, shape)
    h, _ = shape
    horizon = int(rng.uniform(0.35, 0.6) * h)
    sky = c.blank()
    sky[:horizon] = 1
    c.paint(sky, SKY)
    _draw_buildings(c, horizon)
    ground = 1 - sky
    c.paint(ground, GRASS)
    _draw_trees(c, horizon)
    road = _draw_road(c, horizon)
    _draw_cars(c, road, horizon)
    _draw_clutter(c)
    img = c.img * rng.uniform(0.85, 1.15) + rng.normal(0, 4, c.img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), c.label


# ------------------------------------------------------------------- output
SCENE_FILE = 'sceneCategories.txt'


def _write_split(root: str, split: str, num_images: int, seed: int) -> List[str]:
    """Images and label maps of one split; returns the image paths."""
    os.makedirs(image_dir(root, split), exist_ok=True)
    os.makedirs(annotation_dir(root, split), exist_ok=True)
    paths = []
    for index in range(num_images):
        # one generator per image: the first N images do not depend on the split size
        rng = np.random.default_rng([seed, list(SPLITS).index(split), index])
        img, label = make_scene(rng, PORTRAIT if index % 4 == 3 else LANDSCAPE)
        stem = f'ADE_{SPLITS[split]}_{index + 1:08d}'
        path = osp.join(image_dir(root, split), stem + '.jpg')
        # the label first: a dataset listing images never meets one without its label
        cv2.imwrite(osp.join(annotation_dir(root, split), stem + '.png'), label)
        cv2.imwrite(path, img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
    return paths


# written first into a folder this generator fills: a later run may then remove
# what an earlier one wrote, finished or interrupted, and nothing else
MARKER = '.convneur_tiny_ade20k'
_OWN_FILE = re.compile(r'ADE_(train|val)_\d{8}\.(jpg|png)$')


def _claim_folder(root: str) -> None:
    """MMSegmentation's ADE20K dataset lists every image of a split's folder:
    a smaller set written over a larger one would train on both. A folder
    this generator wrote before (its marker, or a complete older set whose
    scene list names each file, all 'street') has those files removed; one
    holding files it did not write is refused, the marker written first."""
    present = {osp.join(kind(root, split), name)
               for split in SPLITS for kind in (image_dir, annotation_dir)
               if osp.isdir(kind(root, split)) for name in os.listdir(kind(root, split))}
    scenes = osp.join(root, SCENE_FILE)
    stems = []
    if osp.isfile(scenes):
        with open(scenes) as f:
            stems = [line.split() for line in f if line.strip()]
    older_set = bool(stems) and all(scene == ['street'] for _, *scene in stems) and present == {
        osp.join(kind(root, split), stem + ext) for stem, *_ in stems
        for split, part in SPLITS.items() if stem.startswith(f'ADE_{part}_')
        for kind, ext in ((image_dir, '.jpg'), (annotation_dir, '.png'))}
    ours = osp.isfile(osp.join(root, MARKER)) or older_set
    foreign = {p for p in present if not (ours and _OWN_FILE.match(osp.basename(p)))}
    if foreign:
        raise FileExistsError(
            f'{root} holds {len(foreign)} files that no earlier run of this generator wrote '
            '(an ADE20K copy?): give an empty or new folder')
    os.makedirs(root, exist_ok=True)
    open(osp.join(root, MARKER), 'w').close()
    if osp.isfile(scenes):  # first: a run stopped from here on is regenerated, not used
        os.remove(scenes)
    for path in present:
        os.remove(path)


def generate_ade20k_tiny(out_dir: str, num_train: int = 64, num_val: int = 16,
                         seed: int = 0) -> Dict[str, List[str]]:
    """Write the tiny dataset under ``out_dir``; returns {split: image paths}.

    The same arguments always give the same files (byte-identical PNG labels;
    the JPEGs as deterministic as the installed libjpeg).
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f'need at least 1 image per split, got train={num_train}, '
                         f'val={num_val}')
    _claim_folder(out_dir)
    counts = dict(training=num_train, validation=num_val)
    paths = {split: _write_split(out_dir, split, counts[split], seed) for split in SPLITS}
    # ADE20K's per-image scene list; written last, so scripts can test completeness
    lines = [f'{osp.splitext(osp.basename(p))[0]} street\n'
             for files in paths.values() for p in files]
    with open(osp.join(out_dir, SCENE_FILE), 'w') as f:
        f.writelines(lines)
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    generator_main(generate_ade20k_tiny, argv)


if __name__ == '__main__':
    main()
