"""convneur_mm/analysis/gate_maps.py: the Figure 4 maps are the first
blocks' branches."""
import pytest
import torch

from convneur_mm.analysis.gate_maps import gate_maps, visualize_gates
from convneur_mm.apis.toolbox import quiet_init
from convneur_mm.models.backbones.convneur import ConvNeur


def small_backbone(**kwargs) -> ConvNeur:
    """ConvNeur-M1 with every stage's output, in eval mode (also the ERF tests')."""
    torch.manual_seed(0)
    model = ConvNeur('m1', out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
                     memory_cfg=dict(chunk_size=64), **kwargs)
    with quiet_init():
        model.init_weights()
    return model.eval()


def test_gate_maps_are_the_first_blocks_branches():
    backbone = small_backbone()
    x = torch.randn(1, 3, 96, 80)
    maps = gate_maps(backbone, x)
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
    assert gate_maps(small_backbone(memory_placement='none'),
                                     torch.randn(1, 3, 64, 64)) == []


def test_a_config_without_a_global_branch_is_an_error(tmp_path):
    import cv2
    import numpy as np
    image = str(tmp_path / 'image.jpg')
    cv2.imwrite(image, np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match='no global branch to visualize'):
        visualize_gates(image, 'ablations/cls_convneur_m3_local_only_300e_in1k.py', None,
                        str(tmp_path / 'gates.png'), short_side=32)
    with pytest.raises(FileNotFoundError, match='cannot read image'):
        visualize_gates(str(tmp_path / 'none.jpg'), 'cls_convneur_m1_300e_in1k.py', None,
                        str(tmp_path / 'gates.png'))
