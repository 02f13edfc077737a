"""A global-context probe in ImageNet's layout: are the two ringed marks the same colour?
(Or, the order probe: is the red mark the upper one?)

The paper claims that the memory branch brings global context that a local
ConvNeXt stack lacks. This task needs exactly that and nothing else: every
image holds ``2 + distractors`` small coloured discs far apart on a cluttered
background. Two of them, the *targets*, wear a white ring; the label is
``same`` if the two targets have the same colour, ``different`` otherwise.

Why a local network fails: a stack of convolutions whose receptive field
never covers both targets, followed by global average pooling and a linear
head, scores an image by ``h(A) + h(B) + clutter``. With three or more
colours no such sum separates "same" from "different" (summing
``2h(k) > t`` over the colours contradicts ``h(i) + h(j) < t``). Colour
counts do not help either: the colours of all marks are drawn first and the
label independently of them, then the targets are picked among the marks as
the label needs, so the colour histogram of the whole image carries no
information about the label. (The histogram of the *plain* marks alone does,
as it is the whole one minus the targets'; reading it takes the same
non-additive pooling as the targets' own colours.)

The *order probe* (``relation='above'``, geometry ``ORDER_PROBE``) asks
instead whether the red target lies above the other one. Both classes hold
the same marks; only their places are swapped. A network that sees the map
as a set of windows, each too small to hold both marks or to see the image's
edge, cannot tell the classes apart, whatever it pools with (GRN and a
LayerNorm included); the memory, which reads its chunks in raster order, can.

Layout (what MMPretrain's ``ImageNet`` dataset reads; see ``convneur_mm.demo_data.imagenet``)::

    OUT_DIR/train/<class>/<class>_0001.JPEG ...   OUT_DIR/val/val_00000001.JPEG ...
    OUT_DIR/meta/train.txt, meta/val.txt, meta/classes.txt

    python -m projects.global_probe.probe.data data/global_probe/ --size 128
"""
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from convneur_mm.demo_data.cli import generator_main
from convneur_mm.demo_data.imagenet import write_imagenet_layout

CLASSES = ('different', 'same')
# the order relation and its classes: is the red target the upper one?
ORDER_RELATION = 'above'
ORDER_CLASSES = ('red_below', 'red_above')
# colour name, RGB: far apart in hue, none of them grey (the clutter is grey)
KINDS: Tuple[Tuple[str, Tuple[int, int, int]], ...] = (
    ('red', (225, 40, 40)),
    ('green', (40, 200, 60)),
    ('blue', (50, 90, 235)),
    ('yellow', (235, 205, 30)),
    ('magenta', (215, 50, 205)),
    ('cyan', (40, 215, 225)),
)
# disc radius as a fraction of the image side, drawn per mark: the marks'
# areas vary 2x, so that a pooled energy (e.g. GRN's L2 norm per channel)
# does not simply count how many targets share a colour. Smaller marks
# (0.03-0.05) were not even learned as "is there a red target" by the
# small test network in 300 steps (58% vs 96% with these).
RADIUS_RANGE = (0.07, 0.1)
MIN_RADIUS = 2.5               # pixels
RING_WIDTH = 0.5               # the targets' white ring, in disc radii
TARGET_MIN_DIST = 0.6          # the targets' distance, as a fraction of the side
MARK_GAP = 3.2                 # centre distance of any two marks, in largest radii
# The order probe (relation 'above'; projects/global_probe/README.md and
# projects/global_probe/configs/cls_convneur_order_probe.py): two ellipses 11.5-14.4 px high
# and 6x as wide at 144 px. For the one-block network, whose local branch sees 28 px,
# their edges are >= 28.8 px apart in y (no window sees both) and >= 24 px
# inside the image (no window that sees the zero padding sees a mark).
ORDER_PROBE = dict(size=144, kinds=2, distractors=0, relation=ORDER_RELATION,
                   radius_range=(0.04, 0.05), aspect=6.0, target_min_dist=0.3, border=0.1667)
# what makes a pair of target colours positive ('same' / 'pair' below)
RELATIONS = {
    # the two targets have the same colour
    'same': lambda a, b: a == b,
    # the targets are one red and one green mark (colours 0 and 1): an AND of
    # two presences, as non-additive as 'same' (2h(red) < t, 2h(green) < t
    # and h(red) + h(green) > t contradict) but with no colour-invariant
    # matching to learn
    'pair': lambda a, b: {a, b} == {0, 1},
    # control, additive: a red target is present. A local network learns it;
    # if it cannot, the marks are too small to see, not too far apart
    'has_red': lambda a, b: 0 in (a, b),
}
ALL_RELATIONS = (*sorted(RELATIONS), ORDER_RELATION)


class Mark(NamedTuple):
    """One disc: centre (x, y) and radius in pixels, colour index, target flag;
    an ellipse ``aspect`` times as wide as high (``radius``: its half-height)."""
    x: float
    y: float
    radius: float
    kind: int
    target: bool
    aspect: float = 1.0


def _layout(rng: np.random.Generator, size: int, count: int, radius: float,
            target_min_dist: float = TARGET_MIN_DIST, ringed: bool = True,
            border: float = 0.0, vertical: bool = False, aspect: float = 1.0) -> np.ndarray:
    """``count`` centres, the first two at least ``target_min_dist * size`` apart
    (in y alone if ``vertical``), all at least MARK_GAP radii apart (x
    distances divided by ``aspect``: ellipses as wide as their x extent) and every
    mark's edge (its ring's if ``ringed``; ``aspect`` times wider than high) at
    least ``border * size`` pixels (and 1) inside the image (rejection
    sampling, a few tries)."""
    extent = radius * (1 + RING_WIDTH if ringed else 1)
    low = np.array([extent * aspect, extent]) + max(1.0, border * size)

    def targets_far(p: np.ndarray, q: np.ndarray) -> bool:
        gap = abs(p[1] - q[1]) if vertical else np.hypot(*(p - q))
        return gap >= target_min_dist * size
    for _ in range(1000):  # dart throwing, restarted when a dart finds no room
        points = [rng.uniform(low, size - low)]
        for n in range(1, count):
            for _ in range(100):
                p = rng.uniform(low, size - low)
                far = min(np.hypot((p[0] - q[0]) / aspect, p[1] - q[1])
                          for q in points) >= MARK_GAP * radius
                if far and (n > 1 or targets_far(p, points[0])):
                    points.append(p)
                    break
            else:
                break
        if len(points) == count:
            return np.stack(points)
    raise ValueError(f'{count} marks do not fit in {size} x {size} pixels; use fewer '
                     'distractors, smaller marks, a smaller distance or border')


def sample_marks(rng: np.random.Generator, label: int, size: int, kinds: int,
                 distractors: int, relation: str = 'same',
                 radius_range: Tuple[float, float] = RADIUS_RANGE,
                 target_min_dist: float = TARGET_MIN_DIST,
                 border: float = 0.0, aspect: float = 1.0) -> List[Mark]:
    """The marks of one image of class ``label`` (index into class_names(relation)).

    The colours of all ``2 + distractors`` marks are i.i.d. (redrawn until
    the image holds both a positive and a negative pair under ``relation``,
    so that either label is possible); the label does not depend on them.
    The two targets are then a random pair of the kind the label asks for.

    With no distractors the two colours are a uniform pair of the kind the
    label asks for: each mark's colour alone says nothing, but the colour
    histogram gives the label away (a probe of pooling, not a dataset).

    ``above``: the targets are red and one other colour, the distractors
    i.i.d.; the positions are drawn first (the targets at least
    ``target_min_dist`` apart in y), then red goes to the upper target for
    ``red_above``, to the lower one for ``red_below``. The colours, and the
    marks' positions as a set, are thus the same for both classes. Its
    marks may be ellipses ``aspect`` times wider than high (``radius``: the
    half-height): more area per mark within the same rows.
    """
    if relation == ORDER_RELATION:
        return _sample_above(rng, label, size, kinds, distractors, radius_range,
                             target_min_dist, border, aspect)
    if aspect != 1.0:
        raise ValueError(f"only 'above' draws ellipses, got aspect {aspect} for {relation!r}")
    count, positive = 2 + distractors, RELATIONS[relation]
    if distractors == 0:
        wanted = [(a, b) for a in range(kinds) for b in range(kinds)
                  if positive(a, b) == bool(label)]
        colours = np.asarray(wanted[int(rng.integers(len(wanted)))])
        order = [0, 1]
    else:
        while True:
            colours = rng.integers(kinds, size=count)
            pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
            wanted = [p for p in pairs
                      if positive(colours[p[0]], colours[p[1]]) == bool(label)]
            if wanted and len(wanted) < len(pairs):
                break
        targets = wanted[int(rng.integers(len(wanted)))]
        others = [i for i in range(count) if i not in targets]
        order = list(targets) + [others[i] for i in rng.permutation(len(others))]
    radii = np.maximum(MIN_RADIUS, rng.uniform(*radius_range, size=count) * size)
    points = _layout(rng, size, count, float(radii.max()), target_min_dist,
                     border=border)
    return [Mark(float(x), float(y), float(r), int(colours[i]), n < 2)
            for n, (i, (x, y), r) in enumerate(zip(order, points, radii))]


def _sample_above(rng: np.random.Generator, label: int, size: int, kinds: int,
                  distractors: int, radius_range: Tuple[float, float],
                  target_min_dist: float, border: float, aspect: float) -> List[Mark]:
    """sample_marks for ``above``: positions first, then which target is red."""
    count = 2 + distractors
    colours = [0, 1 + int(rng.integers(kinds - 1))] + list(rng.integers(kinds, size=distractors))
    radii = np.maximum(MIN_RADIUS, rng.uniform(*radius_range, size=count) * size)
    points = _layout(rng, size, count, float(radii.max()), target_min_dist,
                     ringed=_ringed(ORDER_RELATION, distractors), border=border, vertical=True,
                     aspect=aspect)
    red_is_upper = points[0][1] < points[1][1]
    if red_is_upper != bool(label):  # swap the targets' places, not their colours
        points[[0, 1]] = points[[1, 0]]
    return [Mark(float(x), float(y), float(r), int(c), n < 2, aspect)
            for n, ((x, y), r, c) in enumerate(zip(points, radii, colours))]


def mark_distance(mark: Mark, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance of pixels (x, y) from ``mark``'s centre, x shrunk by its aspect:
    below ``mark.radius`` inside the mark (how make_image draws it)."""
    return np.hypot((x - mark.x) / mark.aspect, y - mark.y)


def _ringed(relation: str, distractors: int) -> bool:
    """Whether the targets wear their ring: always for the colour relations
    (the measurements of projects/global_probe/README.md were taken so), for ``above`` only
    when distractors need telling apart from them."""
    return relation in RELATIONS or distractors > 0


def class_names(relation: str) -> Tuple[str, str]:
    """The two classes of ``relation``: the label is an index into them."""
    return ORDER_CLASSES if relation == ORDER_RELATION else CLASSES


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dim grey gradient with grey clutter strokes: texture, but no colour."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c0, c1 = rng.uniform(40, 110, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y) / size / 2 + 0.5
    img = np.repeat((c0 * (1 - t) + c1 * t)[..., None], 3, axis=2)
    for _ in range(int(rng.integers(3, 7))):  # grey line segments
        (x0, y0), (x1, y1) = rng.uniform(0, size, size=(2, 2))
        length = max(np.hypot(x1 - x0, y1 - y0), 1.0)
        u = np.clip(((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / length ** 2, 0, 1)
        d = np.hypot(x - x0 - u * (x1 - x0), y - y0 - u * (y1 - y0))
        img[d < 1.0] = rng.uniform(20, 200)
    return img


def make_image(rng: np.random.Generator, label: int, size: int = 128, kinds: int = 4,
               distractors: int = 2, relation: str = 'same',
               radius_range: Tuple[float, float] = RADIUS_RANGE,
               target_min_dist: float = TARGET_MIN_DIST,
               border: float = 0.0, aspect: float = 1.0) -> Tuple[np.ndarray, List[Mark]]:
    """One RGB uint8 ``size`` x ``size`` image of class ``label`` and its marks.

    ``radius_range`` (disc radii), ``target_min_dist`` and ``border`` (every
    mark's least distance from the image's edge), all fractions of the side,
    and ``aspect`` (``above``'s marks as ellipses) serve the probe's studies
    (projects/global_probe/README.md); the dataset keeps the defaults.
    """
    if relation not in ALL_RELATIONS:
        raise ValueError(f'relation must be one of {ALL_RELATIONS}, got {relation!r}')
    # two colours: additive beside distractors; without any, the two marks'
    # same/different is the plain XOR (projects/global_probe/README.md, "pooling"). The order
    # relation needs red and one other colour.
    order = relation == ORDER_RELATION
    fewest = 2 if distractors == 0 or order else 3
    if not fewest <= kinds <= len(KINDS):
        why = ('red and one other colour' if order else
               'with 2 colours and distractors either colour relation is additive')
        raise ValueError(f'kinds must be in [{fewest}, {len(KINDS)}] ({why}), got {kinds}')
    marks = sample_marks(rng, label, size, kinds, distractors, relation,
                         radius_range, target_min_dist, border, aspect)
    ringed = _ringed(relation, distractors)
    img = _background(rng, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    for mark in marks:
        d = mark_distance(mark, x, y)
        if mark.target and ringed:
            img[(d >= mark.radius) & (d < mark.radius * (1 + RING_WIDTH))] = 245
        shade = np.clip(np.asarray(KINDS[mark.kind][1]) + rng.normal(0, 12, 3), 0, 255)
        img[d < mark.radius] = shade
    img = img + rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), marks


def generate_global_probe(out_dir: str, train_per_class: int = 500, val_per_class: int = 100,
                          size: int = 128, kinds: int = 4, distractors: int = 2,
                          relation: str = 'same', min_dist: float = TARGET_MIN_DIST,
                          border: float = 0.0, radius_lo: float = RADIUS_RANGE[0],
                          radius_hi: float = RADIUS_RANGE[1], aspect: float = 1.0,
                          seed: int = 0) -> Dict[str, str]:
    """Write the probe under ``out_dir``; returns {split: list file}.

    Classes are exactly balanced per split. The same arguments always give
    the same files (byte-identical lists; the JPEGs as deterministic as the
    installed libjpeg). ``min_dist``, ``border``, ``radius_lo`` / ``radius_hi``
    and ``aspect``: make_image's ``target_min_dist``, ``border``,
    ``radius_range`` and ``aspect``.
    """
    if distractors < 1 and relation != ORDER_RELATION:
        raise ValueError(f'need at least 1 distractor (else the colour histogram '
                         f'gives the label away), got {distractors}')
    options = dict(size=size, kinds=kinds, distractors=distractors, relation=relation,
                   target_min_dist=min_dist, border=border,
                   radius_range=(radius_lo, radius_hi), aspect=aspect)
    return write_imagenet_layout(out_dir, class_names(relation),
                                 lambda rng, label: make_image(rng, label, **options)[0],
                                 train_per_class, val_per_class, seed)


def main(argv: Optional[List[str]] = None) -> None:
    generator_main(generate_global_probe, argv)


if __name__ == '__main__':
    main()
