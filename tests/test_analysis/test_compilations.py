"""convneur_mm/analysis/compilations.py: the graphs ``--compile`` compiles
while a model evaluates images of varying sizes."""
import os.path as osp

import pytest

from convneur_mm.analysis.compilations import (count_compilations, format_compilations,
                                               image_sizes, resized)
from ..paths import REPO

SEG_CONFIG = osp.join(REPO, 'configs', 'fpn_convneur_m2_80k_ade20k.py')


def test_image_sizes_and_the_test_resize():
    sizes = image_sizes(50, 640, seed=0)
    assert all(max(s) == 640 and 320 <= min(s) <= 640 for s in sizes)
    assert {s[0] < s[1] for s in sizes} == {True, False}  # both orientations
    assert sizes == image_sizes(50, 640, seed=0)
    # COCO's 1333x800: the short side to 800 unless the long one passes 1333
    assert resized((480, 640), (1333, 800)) == (800, 1067)
    assert resized((640, 320), (1333, 800)) == (1333, 667)
    # ADE20K's (2048, 512): the tiny demo's (512, 128)
    assert resized((60, 45), (512, 128)) == (171, 128)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match='images must be >= 1'):
        count_compilations(SEG_CONFIG, images=0)
    with pytest.raises(ValueError, match='backend must be one of'):
        count_compilations(SEG_CONFIG, backend='aot')


@pytest.mark.torch_pinned
@pytest.mark.slow
@pytest.mark.parametrize('static', [False, True], ids=['automatic-dynamic', 'static'])
def test_evaluation_graphs_of_the_ade20k_config(static):
    """Semantic FPN M2 (backbone, neck, decode head) on six images that its
    test pipeline resizes to six unpadded shapes, 512 by 564 to 760: static
    shapes compile each part once per shape, automatic dynamic shapes (what
    ``--compile`` does in evaluation) twice in all. About 20 s of Dynamo
    tracing each."""
    lines = []
    result = count_compilations(SEG_CONFIG, images=6, seed=0, static=static, log=lines.append)
    assert (result['images'], result['shapes'], len(result['parts'])) == (6, 6, 3)
    assert result['graphs'] == (6 * 3 if static else 2 * 3)
    assert len(lines) == 1 + 6 and [r['graphs'] for r in result['per_image']][-1] == \
        result['graphs']
    assert format_compilations(result) == \
        f'6 images, 6 distinct input shapes, {result["graphs"]} graph(s) compiled for 3 part(s)'
