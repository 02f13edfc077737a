"""``check_checkpoint_fits``: the whole model (an evaluation, a resume), or
its backbone only (a training's ``load_from``, where another task's head may
differ)."""
import pytest
import torch
from torch import nn

from convneur_mm.models.backbones import ConvNeur
from convneur_mm.models.utils.pretrained import CheckpointMismatchError, check_checkpoint_fits


class _Detector(nn.Module):
    def __init__(self, classes: int, memory_dim: int = 80, out_indices=(0, 1, 2, 3)):
        super().__init__()
        arch = dict(depths=[1, 1, 1, 1], dims=[16, 32, 64, 128], memory_dim=memory_dim)
        self.backbone = ConvNeur(arch=arch, out_indices=out_indices)
        self.head = nn.Linear(128, classes)


def _saved(model: nn.Module, path) -> str:
    torch.save(dict(state_dict=model.state_dict()), path)
    return str(path)


def test_another_head_fits_a_load_from_but_not_an_evaluation(tmp_path):
    checkpoint = _saved(_Detector(classes=80), tmp_path / 'coco.pth')
    other_head = _Detector(classes=3)
    check_checkpoint_fits(other_head, checkpoint, backbone_only=True)
    with pytest.raises(CheckpointMismatchError, match='the model of this config'):
        check_checkpoint_fits(other_head, checkpoint)


def test_output_norms_may_be_absent_but_the_backbone_must_fit(tmp_path):
    classifier = _saved(_Detector(classes=3, out_indices=(3, )), tmp_path / 'cls.pth')
    check_checkpoint_fits(_Detector(classes=3), classifier, backbone_only=True)  # norm0-2 new
    with pytest.raises(CheckpointMismatchError,
                       match=r'(?s)the backbone of this config.*shape mismatches.*init_cfg'):
        check_checkpoint_fits(_Detector(classes=3, memory_dim=48), classifier,
                              backbone_only=True)
    torch.save(dict(state_dict={'head.weight': torch.zeros(3, 128)}), tmp_path / 'head.pth')
    with pytest.raises(CheckpointMismatchError, match='missing keys: .*stages'):
        check_checkpoint_fits(_Detector(classes=3), str(tmp_path / 'head.pth'),
                              backbone_only=True)


def test_a_model_without_a_backbone_is_left_to_mmengine_for_a_load_from(tmp_path):
    checkpoint = _saved(nn.Linear(2, 3), tmp_path / 'other.pth')
    check_checkpoint_fits(nn.Linear(4, 3), checkpoint, backbone_only=True)  # nothing of ours
    with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
        check_checkpoint_fits(nn.Linear(4, 3), checkpoint)
