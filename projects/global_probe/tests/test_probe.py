"""The global-context probe: its files, its labels, and that nothing but the
targets' joint colours gives the label away."""
import filecmp
import os
import os.path as osp
from collections import Counter, defaultdict

import cv2
import numpy as np
import pytest

from projects.global_probe.probe.data import (CLASSES, KINDS, ORDER_CLASSES, ORDER_PROBE,
                                              RELATIONS, TARGET_MIN_DIST, generate_global_probe,
                                              main, make_image, mark_distance, sample_marks)

from tests.threads import one_thread

CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs')


def _bayes_accuracy(features, labels) -> float:
    """The best accuracy of any function of ``features`` on these samples."""
    counts = defaultdict(Counter)
    for feature, label in zip(features, labels):
        counts[feature][label] += 1
    return sum(max(c.values()) for c in counts.values()) / len(labels)


def _samples(relation: str, count: int = 4000, kinds: int = 4, distractors: int = 2):
    rng = np.random.default_rng(0)
    labels = rng.integers(2, size=count)
    return [sample_marks(rng, int(label), 128, kinds, distractors, relation)
            for label in labels], labels


# one relation by default, the others `slow`: each samples and checks 128 images
@pytest.mark.parametrize('relation', [r if i == 0 else pytest.param(r, marks=pytest.mark.slow)
                                      for i, r in enumerate(sorted(RELATIONS))])
def test_label_is_the_targets_relation_and_not_a_colour_count(relation):
    marks, labels = _samples(relation)
    for image, label in zip(marks, labels):
        a, b = [m.kind for m in image if m.target]
        assert RELATIONS[relation](a, b) == bool(label)
        assert np.hypot(image[0].x - image[1].x, image[0].y - image[1].y) >= (
            TARGET_MIN_DIST * 128)

    def histogram(image, which=lambda m: True):
        return tuple(np.bincount([m.kind for m in image if which(m)], minlength=len(KINDS)))

    # the targets' colours decide the label (the statistic is computed right) ...
    assert _bayes_accuracy([histogram(i, lambda m: m.target) for i in marks], labels) == 1.0
    # ... but the colour histogram of all marks, or how many colours appear, does not:
    # on 4000 samples any function of them is right about half the time (sampling
    # noise over ~30 histograms is ~0.01; i.i.d. distractors beside two targets
    # would give the histogram ~0.6 for 'same')
    assert _bayes_accuracy([histogram(i) for i in marks], labels) < 0.54
    assert _bayes_accuracy([len(set(m.kind for m in i)) for i in marks], labels) < 0.53


def test_iid_distractors_would_leak_the_label():
    """The control that the histogram check can fail: colours drawn for the
    targets first and i.i.d. for the distractors reveal 'same' in the counts."""
    rng = np.random.default_rng(0)
    labels = rng.integers(2, size=4000)
    histograms = []
    for label in labels:
        a = int(rng.integers(4))
        b = a if label else int((a + rng.integers(1, 4)) % 4)
        kinds = [a, b, *rng.integers(4, size=2)]
        histograms.append(tuple(np.bincount(kinds, minlength=4)))
    assert _bayes_accuracy(histograms, labels) > 0.6


def test_images_show_the_marks():
    img, marks = make_image(np.random.default_rng(3), 1, size=96, kinds=3)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    for mark in marks:
        colour = img[int(round(mark.y)), int(round(mark.x))].astype(int)
        assert np.abs(colour - KINDS[mark.kind][1]).max() < 60
        ring = img[int(round(mark.y)), int(round(mark.x + mark.radius * 1.25))].astype(int)
        assert (ring.min() > 200) == mark.target  # only the targets wear a white ring
    with pytest.raises(ValueError, match='kinds'):
        make_image(np.random.default_rng(0), 0, kinds=2)


def test_dataset_format_balance_and_determinism(tmp_path):
    first, second = str(tmp_path / 'a'), str(tmp_path / 'b')
    lists = generate_global_probe(first, train_per_class=6, val_per_class=3, size=64, seed=7)
    main([second, '--train-per-class', '6', '--val-per-class', '3', '--size', '64',
          '--seed', '7'])
    with open(osp.join(first, 'meta', 'classes.txt')) as f:
        assert f.read().split() == list(CLASSES)
    for split, per_class in (('train', 6), ('val', 3)):
        with open(lists[split]) as f:
            lines = [line.split() for line in f.read().splitlines()]
        assert Counter(label for _, label in lines) == {'0': per_class, '1': per_class}
        for rel, label in lines:
            if split == 'train':
                assert rel.startswith(f'{CLASSES[int(label)]}/')
            else:
                assert '/' not in rel
            img = cv2.imread(osp.join(first, split, rel))
            assert img.shape == (64, 64, 3)
            assert filecmp.cmp(osp.join(first, split, rel), osp.join(second, split, rel),
                               shallow=False)
        assert filecmp.cmp(lists[split], osp.join(second, 'meta', f'{split}.txt'),
                           shallow=False)
    other = str(tmp_path / 'c')
    generate_global_probe(other, train_per_class=6, val_per_class=3, size=64, seed=8)
    name = 'same/same_0001.JPEG'
    assert not filecmp.cmp(osp.join(first, 'train', name), osp.join(other, 'train', name),
                           shallow=False)
    assert sorted(os.listdir(osp.join(first, 'train'))) == sorted(CLASSES)


def test_above_is_the_targets_order_with_the_same_marks_in_both_classes():
    """The order probe: red and green, the red mark above or below; no
    window of the one-block network (28 px) sees both marks or the padding."""
    rng = np.random.default_rng(0)
    labels = rng.integers(2, size=4000)
    options = {k: v for k, v in ORDER_PROBE.items() if k != 'relation'}
    marks = [sample_marks(rng, int(label), relation='above', **options) for label in labels]
    size = ORDER_PROBE['size']
    for (red, other), label in zip(marks, labels):
        assert red.kind == 0 and other.kind == 1 and red.target and other.target
        assert (red.y < other.y) == bool(label)
        assert abs(red.y - other.y) - red.radius - other.radius >= 28
        for m in (red, other):
            half_width = m.radius * m.aspect
            assert m.aspect == 6 and min(m.y - m.radius, m.x - half_width) >= 24
            assert max(m.y + m.radius, m.x + half_width) <= size - 24
    # where the marks fall on the stride-4 grid, which a window could tell, says
    # nothing of the label (16 joint bins of 250 samples: noise ~0.025); only
    # the order does, and the absolute height that no window sees
    for axis in ('x', 'y'):
        grid = [(int(getattr(a, axis) % 4), int(getattr(b, axis) % 4)) for a, b in marks]
        assert _bayes_accuracy(grid, labels) < 0.56, axis
    assert _bayes_accuracy([m[0].y < m[1].y for m in marks], labels) == 1.0


def test_order_probe_pixels_stay_out_of_every_window_that_sees_padding_or_both():
    """The same on the drawn pixels, against the windows of the one-block
    network: output token i (of 36) sees pixel rows 4i - 12 .. 4i + 15, so
    the tokens that see the zero padding (i <= 2, i >= 33) see rows < 24 or
    >= 120, and two rows share a window only if they are < 28 apart."""
    size = ORDER_PROBE['size']
    y, x = np.mgrid[0:size, 0:size]
    for i in range(200):
        _, marks = make_image(np.random.default_rng(i), i % 2, **ORDER_PROBE)
        spans = []
        for m in marks:
            drawn = mark_distance(m, x, y) < m.radius
            rows, cols = np.flatnonzero(drawn.any(1)), np.flatnonzero(drawn.any(0))
            assert min(rows[0], cols[0]) >= 24 and max(rows[-1], cols[-1]) < size - 24
            spans.append((rows[0], rows[-1]))
        (_, upper_bottom), (lower_top, _) = sorted(spans)
        assert lower_top - upper_bottom >= 28


def test_above_images_and_dataset(tmp_path):
    img, (red, green) = make_image(np.random.default_rng(1), 1, **ORDER_PROBE)
    for m, kind in ((red, 0), (green, 1)):
        colour = img[int(round(m.y)), int(round(m.x + m.radius * m.aspect * 0.8))].astype(int)
        assert np.abs(colour - KINDS[kind][1]).max() < 60  # an ellipse, 6x as wide
        ring = img[int(round(m.y + m.radius * 1.25)), int(round(m.x))].astype(int)
        assert ring.min() < 200  # no ring: without distractors nothing needs marking
    assert red.y < green.y
    lists = generate_global_probe(str(tmp_path), train_per_class=2, val_per_class=1,
                                  size=64, distractors=0, relation='above', seed=0)
    assert sorted(os.listdir(tmp_path / 'train')) == sorted(ORDER_CLASSES)
    with open(lists['val']) as f:
        assert sorted(line.split()[1] for line in f) == ['0', '1']
    with pytest.raises(ValueError, match='distractor'):
        generate_global_probe(str(tmp_path / 'x'), distractors=0, relation='same')
    with pytest.raises(ValueError, match='relation'):
        make_image(np.random.default_rng(0), 0, relation='below')
    with pytest.raises(ValueError, match='only .above. draws ellipses'):
        make_image(np.random.default_rng(0), 0, aspect=2.0)
    with pytest.raises(ValueError, match='do not fit'):
        make_image(np.random.default_rng(0), 0, **dict(ORDER_PROBE, target_min_dist=0.6))


def test_the_order_recipe_writes_the_order_probe():
    """configs/cls_convneur_order_probe.py hands the generator the
    geometry that ORDER_PROBE names (and the learning test below uses)."""
    import inspect

    from convneur_mm.demo_data.cli import generator_main
    from convneur_mm.apis.launch import load_config
    recipe = load_config(osp.join(CONFIGS, 'cls_convneur_order_probe.py'))
    seen = {}

    def generate(out_dir, **kwargs):
        seen.update(kwargs)
        return {}
    generate.__signature__ = inspect.signature(generate_global_probe)
    generate.__module__ = generate_global_probe.__module__
    generator_main(generate, ['out', *recipe.data_generator_args])
    expected = dict(ORDER_PROBE, min_dist=ORDER_PROBE['target_min_dist'],
                    radius_lo=ORDER_PROBE['radius_range'][0],
                    radius_hi=ORDER_PROBE['radius_range'][1])
    for key in ('target_min_dist', 'radius_range'):
        del expected[key]
    assert {k: seen[k] for k in expected} == expected
    assert tuple(recipe.classes) == ORDER_CLASSES
    assert recipe.data_generator == generate_global_probe.__module__


@pytest.mark.parametrize('name', ['cls_convneur_m1_global_probe.py',
                                  'cls_convneur_order_probe.py'])
def test_the_projects_recipes_load_and_build(name):
    """The recipes live in the project (configs/), based on the package's
    tiny-ImageNet recipe; each names this project's generator and builds."""
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    recipe = load_config(osp.join(CONFIGS, name))
    assert recipe.data_generator == generate_global_probe.__module__
    model = build_model(recipe, init=False)
    assert model.head.fc.out_features == len(recipe.classes)


# ------------------------------------------------------------ learning
@pytest.fixture
def single_thread():
    with one_thread():
        yield


@pytest.mark.slow
def test_local_only_sees_the_marks_but_not_their_relation(single_thread):
    """The small local-only ConvNeur of the probe runs (projects.global_probe.probe.train)
    learns the additive control (is a target red?) from the same images, so
    the marks are visible and the loop trains; the relation stays at chance.

    What this does NOT show (projects/global_probe/README.md): that the memory learns this
    relation. In the CPU-sized budgets tried the memory (up to 1200 steps)
    and global self-attention (400 steps) stayed at chance on 'same'. The
    ours-vs-local-only check is the XOR test below, on a strictly local
    network.
    """
    from projects.global_probe.probe.train import probe_data, train_probe
    results = {}
    for relation in ('has_red', 'same'):
        options = dict(size=64, kinds=3, distractors=1, relation=relation)
        data = probe_data(0, 2000, 400, **options)
        results[relation] = train_probe('local', seed=0, steps=300, batch=64, data=data)
    assert results['has_red']['val_acc'] > 0.85, results
    assert results['same']['val_acc'] < 0.62, results


# the pooling study of projects/global_probe/README.md: two discs, the same colour or not, out of
# two colours and with no distractors -- the plain XOR of two far-apart marks
XOR = dict(size=96, kinds=2, distractors=0, relation='same', radius_range=(0.12, 0.15),
           target_min_dist=0.65)
# one stage of one block: the local branch sees 4 + 6 * 4 = 28 pixels
ONE_BLOCK = dict(arch=dict(depths=[1], dims=[32], memory_dim=16),
                 memory_cfg=dict(chunk_size=64))


@pytest.mark.slow
def test_xor_marks_lie_beyond_one_blocks_field_and_each_colour_is_uninformative():
    rng = np.random.default_rng(0)
    labels = rng.integers(2, size=2000)
    marks = [sample_marks(rng, int(label), XOR['size'], XOR['kinds'], 0, 'same',
                          XOR['radius_range'], XOR['target_min_dist']) for label in labels]
    for (a, b), label in zip(marks, labels):
        gap = np.hypot(a.x - b.x, a.y - b.y) - a.radius - b.radius
        assert gap > 28  # no window of the local branch sees both colours
        assert (a.kind == b.kind) == bool(label)
    # either mark's colour alone says nothing; both together say everything
    assert _bayes_accuracy([m[0].kind for m in marks], labels) < 0.53
    assert _bayes_accuracy([m[1].kind for m in marks], labels) < 0.53
    assert _bayes_accuracy([(m[0].kind, m[1].kind) for m in marks], labels) == 1.0


def test_probe_model_without_its_global_poolings():
    from torch import nn

    from convneur_mm.models.layers.local_branch import GRN
    from projects.global_probe.probe.train import build_probe_model
    full = build_probe_model('local', **ONE_BLOCK)[0]
    assert any(isinstance(m, GRN) for m in full.modules())
    assert not isinstance(full.norm0, nn.Identity)
    strict = build_probe_model('local', **ONE_BLOCK, without=('grn', 'final_norm'))[0]
    assert not any(isinstance(m, GRN) for m in strict.modules())
    assert isinstance(strict.norm0, nn.Identity)
    # the norms inside the network stay: only the one after global pooling goes
    assert not isinstance(strict.downsample_layers[0][1], nn.Identity)
    with pytest.raises(ValueError, match='without'):
        build_probe_model('local', without=('layernorm',))
    with pytest.raises(ValueError, match=r'kinds must be in \[2, '):
        make_image(np.random.default_rng(0), 0, kinds=1, distractors=0)


@pytest.mark.slow
def test_memory_relates_far_marks_that_a_strictly_local_network_cannot(single_thread):
    """With every GRN and the norm after global pooling removed (both pool
    over the whole map), the local-only network is strictly local: a sum of
    windows of 28 pixels, which cannot express the XOR of two marks farther
    apart (at best 75%: below). The memory is then the only path across the
    image, and ConvNeur learns the task; local-only does not. (With its GRN
    and final norm back, local-only learns it too, given more steps: together
    they pool colours non-additively; projects/global_probe/README.md, "Local-only is not
    local".)

    Whether 150 steps from scratch find the solution depends on the seed and
    on the CPU's rounding: seed 0 learned on the AMD EPYC VMs and stayed at
    chance on a Sapphire Rapids Xeon, where seed 1 learned (val 1.0 by step
    50). So ConvNeur gets up to three seeds, and must learn on one of them;
    local-only, bounded by 75% whatever its weights, gets one."""
    from projects.global_probe.probe.train import probe_data, train_probe
    data = probe_data(0, 1000, 400, **XOR)
    strict = dict(ONE_BLOCK, without=('grn', 'final_norm'))

    def val_acc(variant: str, seed: int) -> float:
        return train_probe(variant, seed=seed, steps=150, batch=32, data=data,
                           model_options=strict)['val_acc']
    results = {'ours': [], 'local': val_acc('local', 0)}
    for seed in range(3):
        results['ours'].append(val_acc('ours', seed))
        if results['ours'][-1] > 0.9:
            break
    assert max(results['ours']) > 0.9, results
    # a sum over windows that never see both colours scores u(A) + u(B): the
    # best threshold on it ("same" iff both red) is right 75% of the time
    assert results['local'] < 0.8, results


@pytest.fixture(scope='module')
def order_probe_data():
    """The order probe's images, made once for both variants below."""
    from projects.global_probe.probe.train import probe_data
    return probe_data(0, 1000, 400, **ORDER_PROBE)


def _order_probe_val_acc(variant: str, data) -> float:
    from projects.global_probe.probe.train import train_probe
    one_block = dict(ONE_BLOCK, memory_cfg=dict(chunk_size=144))  # 9 chunks of 36 x 36
    return train_probe(variant, seed=0, steps=150, batch=32, data=data,
                       model_options=one_block)['val_acc']


# The order probe, on ConvNeur's own one-block network (GRN and final norm in
# place): both classes hold the same two marks, so the local-only network,
# which sees the map as a set of 28 px windows, cannot beat chance; the
# memory, reading its chunks in raster order, learns which mark came first.
# One check in two tests (a training each) that share the images.
@pytest.mark.slow
def test_memory_learns_the_order_of_far_marks(order_probe_data, single_thread):
    """Fails when the gate's global input is zeroed (projects/global_probe/README.md)."""
    ours = _order_probe_val_acc('ours', order_probe_data)
    assert ours > 0.9, ours


@pytest.mark.slow
def test_local_only_stays_at_chance_on_the_order_of_far_marks(order_probe_data, single_thread):
    local = _order_probe_val_acc('local', order_probe_data)
    # 400 validation images: one standard error at chance is 2.5 points
    assert local < 0.6, local
