"""The README's backbone snippet (also docs/user_guides/use_in_your_project.md),
as written, in an MMDetection and an MMSegmentation base config of a user's
project: the model builds, loads a converter's ``backbone.`` checkpoint and
gives its neck four maps; and as the guide words it for bases without a neck
(UperNet, an MMPretrain classifier)."""
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from convneur_mm.apis.toolbox import build_model
from convneur_mm.models.backbones import ConvNeur
from tests.paths import REPO

BASES = {'mmdet': 'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
         'mmseg': 'mmseg::_base_/models/fpn_r50.py'}


@pytest.fixture(autouse=True)
def _scope_left_as_found():
    """build_model makes its toolbox the default scope: the next test in this
    process must not build in it."""
    with DefaultScope.overwrite_default_scope('mmengine'):
        yield


def _snippets():
    """The python blocks that set a ConvNeur backbone, from each page."""
    for page in ('README.md', 'docs/user_guides/use_in_your_project.md'):
        text = open(f'{REPO}/{page}').read()
        blocks = [b for b in re.findall(r'```python\n(.*?)```', text, re.S)
                  if "type='convneur_mm.ConvNeur'" in b and '_base_' not in b]
        assert blocks, page
        yield page, blocks[0]


@pytest.mark.parametrize('scope', sorted(BASES))
@pytest.mark.parametrize('page,snippet', list(_snippets()))
def test_the_snippet_builds_loads_and_feeds_the_neck(scope, page, snippet, tmp_path):
    torch.manual_seed(0)
    source = ConvNeur(arch='m3', out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
    checkpoint = tmp_path / 'm3.pth'  # as the converters write it: backbone.-prefixed keys
    torch.save(dict(state_dict={'backbone.' + k: v for k, v in source.state_dict().items()}),
               checkpoint)
    config = tmp_path / 'mine.py'
    config.write_text(f'_base_ = [{BASES[scope]!r}]\n' +
                      snippet.replace("'m3.pth'", repr(str(checkpoint))))
    if scope == 'mmseg':  # as the snippet's last comment says
        assert 'MMSegmentation: also pretrained=None in model' in snippet
        config.write_text(config.read_text() + 'model.update(pretrained=None)\n')
    cfg = Config.fromfile(str(config))
    cfg.default_scope = scope  # a model base sets none: the user's dataset and runtime bases do
    model = build_model(cfg, init=False)
    model.init_weights()
    own = model.backbone.state_dict()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in own.items())
    model.eval()
    with torch.no_grad():
        maps = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert len(maps) >= 4 and all(m.dim() == 4 for m in maps)


# use_in_your_project.md's words for the bases without a neck, as config lines
WITHOUT_NECK = {
    'mmseg::_base_/models/upernet_r50.py': (
        'model.update(pretrained=None, decode_head=dict(in_channels=[64, 128, 256, 512]), '
        'auxiliary_head=dict(in_channels=256))\n', 'mmseg'),
    'mmpretrain::_base_/models/resnet50.py': (
        "model.update(neck=None, head=dict(in_channels=512))\n"
        "model['backbone'].update(out_indices=(3, ), gap_before_final_norm=True)\n", 'mmpretrain'),
}


@pytest.mark.parametrize('base', sorted(WITHOUT_NECK))
def test_the_snippet_without_its_neck_line_in_a_base_without_a_neck(base, tmp_path):
    lines, scope = WITHOUT_NECK[base]
    page = open(f'{REPO}/docs/user_guides/use_in_your_project.md').read()
    assert 'decode_head=dict(in_channels=[64, 128, 256, 512])' in page and '`neck=None`' in page
    _, snippet = next(_snippets())
    snippet = re.sub(r',\n    neck=dict\(.*\)\)', ')', snippet)  # the neck line dropped
    assert 'neck=dict' not in snippet
    snippet = snippet.replace("init_cfg=dict(type='Pretrained', checkpoint='m3.pth', "
                              "prefix='backbone.')", 'init_cfg=None')
    config = tmp_path / 'mine.py'
    config.write_text(f'_base_ = [{base!r}]\n' + snippet + lines)
    cfg = Config.fromfile(str(config))
    cfg.default_scope = scope
    model = build_model(cfg).eval()
    with torch.no_grad():
        if scope == 'mmpretrain':
            out = model(torch.randn(1, 3, 64, 64), mode='tensor')
            assert out.shape == (1, 1000)
        else:
            assert len(model.extract_feat(torch.randn(1, 3, 64, 64))) == 4
