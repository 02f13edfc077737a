"""Figure 4 gate panels and effective-receptive-field maps: what the maps
measure, and that the scripts write PNGs."""
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from convneur_mm.models.backbones.convneur import ConvNeur
from convneur_mm.apis.toolbox import quiet_init
from ..markdown import table_rows
from ..paths import ANALYSIS_TOOLS, REPO, import_analysis_tool

erf_tool = import_analysis_tool('effective_receptive_field')
visualize_gates = import_analysis_tool('visualize_gates')


def _run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run tools/analysis_tools/SCRIPT from the repository root."""
    return subprocess.run(
        [sys.executable, osp.join(ANALYSIS_TOOLS, script), *args],
        cwd=REPO, capture_output=True, text=True)


def _backbone(**kwargs) -> ConvNeur:
    torch.manual_seed(0)
    model = ConvNeur('m1', out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
                     memory_cfg=dict(chunk_size=64), **kwargs)
    with quiet_init():
        model.init_weights()
    return model.eval()


def test_gate_maps_are_the_first_blocks_branches():
    backbone = _backbone()
    x = torch.randn(1, 3, 96, 80)
    maps = visualize_gates.gate_maps(backbone, x)
    assert len(maps) == 4  # one global branch per stage
    # recompute stage 1's maps by hand from the first block's input
    with torch.no_grad():
        block_input = backbone.downsample_layers[0](x)
        local, glob, fused = backbone.stages[0][0].branches(block_input)
    assert torch.allclose(fused, torch.sigmoid(glob) * local)
    expected = (fused - local)[0].abs().sum(0)
    assert maps[0]['influence'].shape == (24, 20)
    assert torch.allclose(maps[0]['influence'], expected)
    assert torch.allclose(maps[0]['local'], local[0].abs().mean(0))
    # Figure 4's F_out row: the gated map, which the gate makes differ from F_loc
    assert torch.allclose(maps[0]['gated'], fused[0].abs().mean(0))
    assert not torch.allclose(maps[0]['gated'], maps[0]['local'], rtol=0.05)
    assert [m['influence'].shape for m in maps] == [(24, 20), (12, 10), (6, 5), (3, 3)]


def test_gate_maps_are_empty_without_a_memory():
    assert visualize_gates.gate_maps(_backbone(memory_placement='none'),
                                     torch.randn(1, 3, 64, 64)) == []


def test_visualize_gates_writes_panels(tmp_path):
    image = tmp_path / 'image.jpg'
    rng = np.random.default_rng(0)
    cv2.imwrite(str(image), rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    out = tmp_path / 'gates.png'
    result = _run_tool('visualize_gates.py', str(image), 'cls_convneur_m1_300e_in1k.py',
                       '--short-side', '64', '--out', str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert '4 stages' in result.stdout
    panels = cv2.imread(str(out))
    assert panels is not None and panels.shape[1] > panels.shape[0]  # 4 columns x 3 rows


def _centre_gradient(model, image: torch.Tensor) -> np.ndarray:
    """|d relu(centre feature).sum() / d input| of one image, summed over colours."""
    image = image.clone().requires_grad_()
    feature = model(image)[-1]
    h, w = feature.shape[-2:]
    torch.relu(feature[0, :, h // 2, w // 2]).sum().backward()
    return image.grad[0].abs().sum(0).numpy()


def test_erf_is_the_mean_input_gradient_of_the_centre():
    model = _backbone()
    # three images of different contrast: their gradient maps differ, so a sum,
    # one image's map or a mean over the wrong number of images all miss
    images = [scale * torch.randn(1, 3, 64, 64) for scale in (0.5, 1.0, 3.0)]
    score = erf_tool.erf(model, images)
    assert score.shape == (64, 64) and (score >= 0).all() and score.sum() > 0
    singles = [_centre_gradient(model, image) for image in images]
    assert not np.allclose(singles[0], singles[2], rtol=0.05)
    assert np.allclose(score, sum(singles) / len(singles), rtol=1e-5, atol=1e-8)


def test_area_shares_grow_with_the_fraction():
    score = np.zeros((10, 10))
    score[5, 5] = 7.0  # 70% of the mass in one pixel of 100
    score[0, :] = 0.3  # the rest spread over a row
    shares = erf_tool.area_shares(score)
    assert shares[0.2] == pytest.approx(0.01)
    assert shares[0.5] == pytest.approx(0.01)
    assert shares[0.9] == pytest.approx(0.08)  # the peak and 7 row pixels (91%)


def test_erf_script_writes_a_figure_and_a_table(tmp_path):
    out = tmp_path / 'erf.png'
    result = _run_tool('effective_receptive_field.py', '--models', 'ConvNeur-M3',
                       'ConvNeur-M3 local-only', '--num-images', '1', '--size', '64',
                       '--out', str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    names = [row[0] for row in table_rows(result.stdout)]
    assert names == ['model', 'ConvNeur-M3', 'ConvNeur-M3 local-only']
    assert f'wrote {out}' in result.stdout
    assert cv2.imread(str(out)) is not None


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
    model = erf_tool.build_backbone('ConvNeur-M3', path)
    torch.testing.assert_close(model.stages[2][0].global_branch.proj_in.weight,
                               detector_backbone.stages[2][0].global_branch.proj_in.weight)
    with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
        erf_tool.build_backbone('ConvNeur-M3', checkpoint('m2')[0])
    # the same blocks without the global branches: every key it has fits, the
    # memory's are extra (they were dropped, and the local-only ERF printed)
    with pytest.raises(CheckpointMismatchError, match='unexpected keys: .*global_branch'):
        erf_tool.build_backbone('ConvNeur-M3 local-only', path)
