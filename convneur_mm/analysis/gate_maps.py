"""Stage-wise global-to-local modulation maps, like the paper's Figure 4.

For the first block of every stage (where the memory sits) the panels show
the local features F_loc, the gated features F_out = sigmoid(G) * F_loc, and
the influence map |F_out - F_loc| summed over channels, each upsampled onto
the image. Works with any of our classification, detection or segmentation
configs; without a checkpoint the weights are random (the maps then show the
architecture, not learned behaviour).
"""
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch

from convneur_mm.models.layers.block import ConvNeurBlock


def load_image(path: str, short_side: int) -> np.ndarray:
    """BGR uint8 image resized so that its short side is ``short_side``."""
    image = cv2.imread(path)
    if image is None:
        raise FileNotFoundError(f'cannot read image {path}')
    scale = short_side / min(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


@torch.no_grad()
def gate_maps(backbone: torch.nn.Module, inputs: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Per stage with a global branch: (H, W) maps of F_loc, F_out, influence."""
    captured = []

    def capture(block, args):
        local, glob, fused = block.branches(args[0])
        if glob is not None:
            captured.append(dict(local=local[0].abs().mean(0), gated=fused[0].abs().mean(0),
                                 influence=(fused - local)[0].abs().sum(0)))

    first_blocks = [stage[0] for stage in backbone.stages if isinstance(stage[0], ConvNeurBlock)]
    handles = [b.register_forward_pre_hook(capture) for b in first_blocks]
    try:
        backbone(inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def _overlay(image: np.ndarray, heat: torch.Tensor) -> np.ndarray:
    heat = heat.float().cpu().numpy()
    heat = (heat - heat.min()) / (np.ptp(heat) + 1e-12)
    heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)
    colour = cv2.applyColorMap(np.uint8(255 * heat.clip(0, 1)), cv2.COLORMAP_JET)
    return cv2.addWeighted(image, 0.45, colour, 0.55, 0)


def plot_gate_maps(image: np.ndarray, maps: List[Dict[str, torch.Tensor]], path: str) -> None:
    """One column per stage, the rows F_loc, F_out and the influence, over the image."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = (('local', 'F_loc (local branch)'), ('gated', 'F_out = sigmoid(G) * F_loc'),
            ('influence', '|F_out - F_loc| (summed over channels)'))
    fig, axes = plt.subplots(len(rows), len(maps), figsize=(3.2 * len(maps), 3.0 * len(rows)),
                             squeeze=False)
    for col, stage_maps in enumerate(maps):
        for row, (key, title) in enumerate(rows):
            ax = axes[row][col]
            ax.imshow(_overlay(image, stage_maps[key])[..., ::-1])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f'stage {col + 1}')
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def visualize_gates(image: str, config: str, checkpoint: Optional[str], out: str,
                    short_side: int = 512) -> int:
    """Draw the gate panels of ``config``'s backbone on ``image`` into ``out``.

    Args:
        image: an image file.
        config: any of our configs (path, or name of a shipped config).
        checkpoint: the model's weights (strictly loaded), or None: random.
        out: the figure's path.
        short_side: the image's short side after resizing.

    Returns:
        The number of stages drawn.
    """
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    cfg = load_config(config)
    model = build_model(cfg, init=checkpoint is None)
    if checkpoint:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    model.eval()
    picture = load_image(image, short_side)
    tensor = torch.from_numpy(picture).permute(2, 0, 1).contiguous()
    inputs = model.data_preprocessor(dict(inputs=[tensor]), training=False)['inputs']
    maps = gate_maps(model.backbone, inputs)
    if not maps:
        raise ValueError(f'{config}: the backbone has no global branch to visualize')
    plot_gate_maps(picture, maps, out)
    return len(maps)
