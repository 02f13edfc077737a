"""tools/analysis_tools/count_compilations.py: the graphs ``--compile``
compiles while a model evaluates images of varying sizes."""
import os.path as osp
import re

import pytest

from ..paths import REPO, import_analysis_tool

SEG_CONFIG = osp.join(REPO, 'configs', 'fpn_convneur_m2_80k_ade20k.py')


def test_image_sizes_and_the_test_resize():
    tool = import_analysis_tool('count_compilations')
    sizes = tool.image_sizes(50, 640, seed=0)
    assert all(max(s) == 640 and 320 <= min(s) <= 640 for s in sizes)
    assert {s[0] < s[1] for s in sizes} == {True, False}  # both orientations
    assert sizes == tool.image_sizes(50, 640, seed=0)
    # COCO's 1333x800: the short side to 800 unless the long one passes 1333
    assert tool.resized((480, 640), (1333, 800)) == (800, 1067)
    assert tool.resized((640, 320), (1333, 800)) == (1333, 667)
    # ADE20K's (2048, 512): the tiny demo's (512, 128)
    assert tool.resized((60, 45), (512, 128)) == (171, 128)


def _summary(capsys) -> dict:
    last = capsys.readouterr().out.strip().splitlines()[-1]
    found = re.fullmatch(r'(\d+) images, (\d+) distinct input shapes, '
                         r'(\d+) graph\(s\) compiled for (\d+) part\(s\)', last)
    assert found, last
    return dict(zip(('images', 'shapes', 'graphs', 'parts'), map(int, found.groups())))


@pytest.mark.torch_pinned
@pytest.mark.slow
@pytest.mark.parametrize('static', [False, True], ids=['automatic-dynamic', 'static'])
def test_evaluation_graphs_of_the_ade20k_config(static, capsys):
    """Semantic FPN M2 (backbone, neck, decode head) on six images that its
    test pipeline resizes to six unpadded shapes, 512 by 564 to 760: static
    shapes compile each part once per shape, automatic dynamic shapes (what
    ``--compile`` does in evaluation) twice in all. About 20 s of Dynamo
    tracing each."""
    tool = import_analysis_tool('count_compilations')
    args = [SEG_CONFIG, '--images', '6', '--seed', '0']
    assert tool.main(args + (['--static'] if static else [])) == 0
    summary = _summary(capsys)
    assert (summary['images'], summary['shapes'], summary['parts']) == (6, 6, 3)
    assert summary['graphs'] == (6 * 3 if static else 2 * 3)
