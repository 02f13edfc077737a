"""The README's backbone snippet (also docs/user_guides/use_in_your_project.md),
as written, in an MMDetection and an MMSegmentation base config of a user's
project: the model builds, loads a converter's ``backbone.`` checkpoint and
gives its neck four maps."""
import re

import pytest
import torch
from mmengine.config import Config

from convneur_mm.apis.toolbox import build_model
from convneur_mm.models.backbones import ConvNeur
from tests.paths import REPO

BASES = {'mmdet': 'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
         'mmseg': 'mmseg::_base_/models/fpn_r50.py'}


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
