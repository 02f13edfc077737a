"""A tiny, deterministic classification dataset in ImageNet's layout.

There is no ImageNet on a fresh machine, yet the classification demo and tests
must train and evaluate the real M1 config (with its full DeiT augmentation)
end to end. This writes, in seconds, what MMPretrain's ``ImageNet`` dataset
reads from an ImageNet prepared with annotation files::

    OUT_DIR/train/<class>/<class>_0001.JPEG ...   (one folder per class)
    OUT_DIR/val/val_00000001.JPEG ...             (flat, classes shuffled)
    OUT_DIR/meta/train.txt, meta/val.txt          ("relative/path.JPEG label")
    OUT_DIR/meta/classes.txt                      (one class name a line)

Every class is one shape in one colour with one surface texture, large
enough that most RandomResizedCrop crops still show it, on a random dim
background: learnable from scratch in a few CPU minutes despite RandAugment,
Mixup and CutMix. Ten classes keep top-5 meaningful (chance is 10% / 50%).

    python -m convneur_mm.demo_data.imagenet data/imagenet_tiny/
"""
import os
import os.path as osp
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .cli import generator_main

# name, shape, RGB colour, texture
CATEGORIES: Tuple[Tuple[str, str, Tuple[int, int, int], str], ...] = (
    ('red_disc', 'disc', (220, 40, 40), 'solid'),
    ('green_square', 'square', (40, 190, 60), 'stripes'),
    ('blue_triangle', 'triangle', (50, 80, 230), 'dots'),
    ('yellow_ring', 'ring', (235, 200, 30), 'solid'),
    ('magenta_cross', 'cross', (210, 50, 200), 'checker'),
    ('cyan_star', 'star', (40, 210, 220), 'solid'),
    ('orange_hexagon', 'hexagon', (245, 130, 20), 'stripes'),
    ('white_crescent', 'crescent', (240, 240, 240), 'solid'),
    ('purple_ellipse', 'ellipse', (120, 50, 170), 'dots'),
    ('brown_frame', 'frame', (140, 85, 40), 'checker'),
)
CLASSES = tuple(name for name, _, _, _ in CATEGORIES)
SPLITS = ('train', 'val')
# (H, W): landscape, portrait and square, as ImageNet's images vary in size
IMAGE_SHAPES = ((128, 160), (160, 128), (144, 144))
RADIUS_RANGE = (0.30, 0.42)  # object radius as a fraction of the shorter side

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]
# draws one RGB uint8 image of a class from its generator: (rng, label) -> image
Draw = Callable[[np.random.Generator, int], np.ndarray]


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    return r < 0.55 + 0.45 * np.cos(5 * theta)


def _hexagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    axes = [np.abs(u * np.cos(a) + v * np.sin(a)) for a in np.arange(3) * np.pi / 3]
    return np.max(axes, axis=0) < 0.87


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    sides = [u * np.cos(a) + v * np.sin(a) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    return np.max(sides, axis=0) < 0.5


# implicit shapes on coordinates normalized by the object radius
SHAPES: Dict[str, Mask] = {
    'disc': lambda u, v: np.hypot(u, v) < 1,
    'square': lambda u, v: np.maximum(np.abs(u), np.abs(v)) < 0.8,
    'triangle': _triangle,
    'ring': lambda u, v: (np.hypot(u, v) < 1) & (np.hypot(u, v) > 0.55),
    'cross': lambda u, v: (((np.abs(u) < 0.3) & (np.abs(v) < 1))
                           | ((np.abs(v) < 0.3) & (np.abs(u) < 1))),
    'star': _star,
    'hexagon': _hexagon,
    'crescent': lambda u, v: (np.hypot(u, v) < 1) & (np.hypot(u - 0.5, v) > 0.75),
    'ellipse': lambda u, v: np.hypot(u, v / 0.5) < 1,
    'frame': lambda u, v: ((np.maximum(np.abs(u), np.abs(v)) < 0.85)
                           & (np.maximum(np.abs(u), np.abs(v)) > 0.5)),
}


def _wave(x: np.ndarray, periods: float) -> np.ndarray:
    """A sine with ``periods`` half-periods per unit (the object's radius)."""
    return np.sin(x * periods * np.pi)


# surface brightness in [0.5, 1] on the same normalized coordinates
TEXTURES: Dict[str, Mask] = {
    'solid': lambda u, v: np.ones_like(u),
    'stripes': lambda u, v: 0.75 + 0.25 * np.sign(_wave(u, 3)),
    'dots': lambda u, v: np.where(_wave(u + 0.125, 4) * _wave(v + 0.125, 4) > 0.5, 0.5, 1.),
    'checker': lambda u, v: 0.75 + 0.25 * np.sign(_wave(u, 2.5) * _wave(v, 2.5)),
}


def _background(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """A dim two-colour gradient: varied, yet never mistaken for an object."""
    h, w = shape
    c0, c1 = rng.uniform(40, 120, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w]
    t = (np.cos(angle) * x / w + np.sin(angle) * y / h + 1)[..., None] / 2
    return c0 * (1 - t) + c1 * t


def make_image(rng: np.random.Generator, label: int) -> np.ndarray:
    """One RGB uint8 image of class ``label``: a random pose, size and shade."""
    _, shape_name, colour, texture = CATEGORIES[label]
    h, w = IMAGE_SHAPES[int(rng.integers(len(IMAGE_SHAPES)))]
    radius = rng.uniform(*RADIUS_RANGE) * min(h, w)
    cx = w / 2 + rng.uniform(-0.15, 0.15) * w
    cy = h / 2 + rng.uniform(-0.15, 0.15) * h
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / radius
    v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / radius
    mask = SHAPES[shape_name](u, v)[..., None]
    shade = np.clip(np.asarray(colour) + rng.normal(0, 15, 3), 0, 255)
    surface = TEXTURES[texture](u, v)[..., None] * shade
    img = np.where(mask, surface, _background(rng, (h, w)))
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(path: str, img: np.ndarray) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    cv2.imwrite(path, img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])


def _write_lines(path: str, lines: List[str]) -> None:
    """Write atomically: a list file appears only once its split is complete."""
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(path + '.tmp', path)


def _write_split(root: str, split: str, classes: Sequence[str], draw: Draw, per_class: int,
                 seed: int) -> str:
    """Images and ``meta/{split}.txt`` of one split; returns the list file's path."""
    items = [(label, index) for label in range(len(classes)) for index in range(per_class)]
    if split == 'val':  # ImageNet's val images are numbered in no class order
        order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(items))
        items = [items[i] for i in order]
    lines = []
    for number, (label, index) in enumerate(items, 1):
        # one generator per image: the first N images do not depend on the split size
        rng = np.random.default_rng([seed, SPLITS.index(split), label, index])
        name = classes[label]
        rel = (f'{name}/{name}_{index + 1:04d}.JPEG' if split == 'train'
               else f'val_{number:08d}.JPEG')
        _write(osp.join(root, split, rel), draw(rng, label))
        lines.append(f'{rel} {label}')
    path = osp.join(root, 'meta', f'{split}.txt')
    _write_lines(path, lines)
    return path


def write_imagenet_layout(out_dir: str, classes: Sequence[str], draw: Draw,
                          train_per_class: int, val_per_class: int,
                          seed: int) -> Dict[str, str]:
    """Write ``classes`` in ImageNet's layout (above) under ``out_dir``, each
    image drawn by ``draw(rng, label)`` from its own generator; returns
    {split: list file}. Every generator of a dataset in this layout (this
    one, the global-context probe) shares it."""
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f'need at least 1 image per class and split, got '
                         f'train={train_per_class}, val={val_per_class}')
    _write_lines(osp.join(out_dir, 'meta', 'classes.txt'), list(classes))
    counts = dict(train=train_per_class, val=val_per_class)
    return {split: _write_split(out_dir, split, classes, draw, counts[split], seed)
            for split in SPLITS}


def generate_imagenet_tiny(out_dir: str, train_per_class: int = 48, val_per_class: int = 10,
                           seed: int = 0) -> Dict[str, str]:
    """Write the tiny dataset under ``out_dir``; returns {split: list file}.

    The same arguments always give the same files (byte-identical lists; the
    JPEGs as deterministic as the installed libjpeg).
    """
    return write_imagenet_layout(out_dir, CLASSES, make_image, train_per_class,
                                 val_per_class, seed)


def main(argv: Optional[List[str]] = None) -> None:
    generator_main(generate_imagenet_tiny, argv)


if __name__ == '__main__':
    main()
