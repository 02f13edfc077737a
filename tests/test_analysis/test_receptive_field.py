"""convneur_mm/analysis/receptive_field.py: what the effective receptive
field measures, and the checkpoints it takes."""
import numpy as np
import pytest
import torch

from convneur_mm.analysis.receptive_field import (area_shares, build_backbone, erf,
                                                  receptive_fields)
from convneur_mm.models.backbones.convneur import ConvNeur
from .test_gate_maps import small_backbone


def _centre_gradient(model, image: torch.Tensor) -> np.ndarray:
    """|d relu(centre feature).sum() / d input| of one image, summed over colours."""
    image = image.clone().requires_grad_()
    feature = model(image)[-1]
    h, w = feature.shape[-2:]
    torch.relu(feature[0, :, h // 2, w // 2]).sum().backward()
    return image.grad[0].abs().sum(0).numpy()


def test_erf_is_the_mean_input_gradient_of_the_centre():
    model = small_backbone()
    # three images of different contrast: their gradient maps differ, so a sum,
    # one image's map or a mean over the wrong number of images all miss
    images = [scale * torch.randn(1, 3, 64, 64) for scale in (0.5, 1.0, 3.0)]
    score = erf(model, images)
    assert score.shape == (64, 64) and (score >= 0).all() and score.sum() > 0
    singles = [_centre_gradient(model, image) for image in images]
    assert not np.allclose(singles[0], singles[2], rtol=0.05)
    assert np.allclose(score, sum(singles) / len(singles), rtol=1e-5, atol=1e-8)


def test_area_shares_grow_with_the_fraction():
    score = np.zeros((10, 10))
    score[5, 5] = 7.0  # 70% of the mass in one pixel of 100
    score[0, :] = 0.3  # the rest spread over a row
    shares = area_shares(score)
    assert shares[0.2] == pytest.approx(0.01)
    assert shares[0.5] == pytest.approx(0.01)
    assert shares[0.9] == pytest.approx(0.08)  # the peak and 7 row pixels (91%)


def test_erf_loads_a_dense_task_checkpoint_and_refuses_another_model(tmp_path):
    """A detector's backbone (the norms of all four outputs) loads; another
    model's weights stop the tool (they were loaded "where they fit" and the
    random-weight figures printed, exit 0)."""
    from convneur_mm.models.utils.pretrained import CheckpointMismatchError

    def checkpoint(arch):
        path = str(tmp_path / f'{arch}.pth')
        backbone = ConvNeur(arch=arch, out_indices=(0, 1, 2, 3))
        torch.save(dict(state_dict={f'backbone.{k}': v for k, v in
                                    backbone.state_dict().items()}), path)
        return path, backbone

    path, detector_backbone = checkpoint('m3')
    model = build_backbone('ConvNeur-M3', path)
    torch.testing.assert_close(model.stages[2][0].global_branch.proj_in.weight,
                               detector_backbone.stages[2][0].global_branch.proj_in.weight)
    with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
        build_backbone('ConvNeur-M3', checkpoint('m2')[0])
    # the same blocks without the global branches: every key it has fits, the
    # memory's are extra (they were dropped, and the local-only ERF printed)
    with pytest.raises(CheckpointMismatchError, match='unexpected keys: .*global_branch'):
        build_backbone('ConvNeur-M3 local-only', path)


def test_unknown_models_and_a_checkpoint_count_that_does_not_fit_are_errors():
    with pytest.raises(ValueError, match='unknown models'):
        receptive_fields(['ConvNeur-M9'])
    with pytest.raises(ValueError, match='one checkpoint per model'):
        receptive_fields(['ConvNeur-M3', 'ResNet-50'], ['a.pth'])
