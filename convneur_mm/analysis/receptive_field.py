"""Effective receptive fields (the OverLoCK paper's Figure 2 protocol).

Following RepLKNet / OverLoCK: for each image, the central point of the last
stage's feature map (ReLU, summed over channels) is back-propagated to the
input; the absolute input gradients, summed over colour channels, are
averaged over the images, then shown as log10(1 + x) normalized to [0, 1].
``area_shares`` gives the share of the image area that holds 20/50/90% of the
total contribution (larger = the model reaches further). Without checkpoints
the weights are random: the map then shows what the architecture can reach at
initialization.
"""
import glob
import os.path as osp
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch

from convneur_mm.apis.toolbox import quiet_init

BACKBONES = {
    'ConvNeur-M3': ('mmpretrain', dict(type='convneur_mm.ConvNeur', arch='m3')),
    'ConvNeur-M3 local-only': ('mmpretrain', dict(type='convneur_mm.ConvNeur', arch='m3',
                                                  memory_placement='none')),
    'ConvNeXt-V2-P': ('mmpretrain', dict(type='ConvNeXt', arch='pico', use_grn=True,
                                         layer_scale_init_value=0.)),
    'ResNet-50': ('mmpretrain', dict(type='ResNet', depth=50)),
}
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def build_backbone(name: str, checkpoint: Optional[str]) -> torch.nn.Module:
    """The backbone ``BACKBONES[name]`` in eval mode, its last stage's map as
    output, with the ``backbone.`` weights of ``checkpoint`` if given."""
    from mmengine.registry import init_default_scope
    scope, cfg = BACKBONES[name]
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    cfg = dict(cfg, out_indices=(3, ))
    if cfg['type'] in ('convneur_mm.ConvNeur', 'ConvNeXt'):
        cfg['gap_before_final_norm'] = False  # keep the spatial map
    model = registry.build(cfg)
    with quiet_init():
        model.init_weights()
    if checkpoint:
        from convneur_mm.models.utils.pretrained import load_pretrained_backbone
        # a detector's or segmentor's checkpoint has the norms of its other
        # outputs too; anything else that does not fit is an error
        load_pretrained_backbone(model, checkpoint, prefix='backbone.', skip_unexpected=True)
    model.eval()
    return model


def load_images(directory: Optional[str], count: int, size: int) -> List[torch.Tensor]:
    """Normalized (1, 3, size, size) tensors."""
    if directory:
        paths = sorted(glob.glob(osp.join(directory, '*.jp*g')) +
                       glob.glob(osp.join(directory, '*.png')))[:count]
        if not paths:
            raise FileNotFoundError(f'no .jpg/.png images in {directory}')
        images = [cv2.resize(cv2.imread(p)[..., ::-1], (size, size)) for p in paths]
    else:
        rng = np.random.default_rng(0)
        images = [cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3)).astype(np.uint8),
                                   (0, 0), 3) for _ in range(count)]
    return [torch.from_numpy(((im - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]
            for im in images]


def erf(model: torch.nn.Module, images: List[torch.Tensor]) -> np.ndarray:
    """Mean |d centre / d input| over the images, (H, W)."""
    total = None
    for image in images:
        image = image.clone().requires_grad_()
        feature = model(image)[-1]
        h, w = feature.shape[-2:]
        # ReLU before the sum, as RepLKNet does: a LayerNorm-ed feature vector
        # sums to zero over channels, which would give no gradient at all
        torch.relu(feature[0, :, h // 2, w // 2]).sum().backward()
        grad = image.grad[0].abs().sum(0).numpy()
        total = grad if total is None else total + grad
    return total / len(images)


def area_shares(score: np.ndarray, fractions=(0.2, 0.5, 0.9)) -> Dict[float, float]:
    """Smallest share of pixels holding each fraction of the total contribution."""
    flat = np.sort(score.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    return {f: float(np.searchsorted(cum, f) + 1) / flat.size for f in fractions}


def plot_receptive_fields(maps: Dict[str, np.ndarray], path: str) -> None:
    """One panel per model: log10(1 + ERF), normalized to [0, 1]."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4), squeeze=False)
    for ax, (name, score) in zip(axes[0], maps.items()):
        shown = np.log10(score + 1)
        shown = (shown - shown.min()) / (np.ptp(shown) + 1e-12)
        ax.imshow(shown, cmap='RdYlGn', vmin=0, vmax=1)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight', pad_inches=0.1)  # titles inside the canvas
    plt.close(fig)


def receptive_fields(models: Sequence[str], checkpoints: Sequence[str] = (),
                     image_dir: Optional[str] = None, num_images: int = 16,
                     size: int = 512) -> Dict[str, np.ndarray]:
    """ERF maps, (size, size), of the named backbones over the same images.

    Args:
        models: names in ``BACKBONES``.
        checkpoints: one per model (their ``backbone.`` keys are used), or none.
        image_dir: a directory of .jpg/.png images (default: smooth random ones).
        num_images: how many images.
        size: the images' side.
    """
    unknown = [m for m in models if m not in BACKBONES]
    if unknown:
        raise ValueError(f'unknown models {unknown}; known: {list(BACKBONES)}')
    if checkpoints and len(checkpoints) != len(models):
        raise ValueError('give one checkpoint per model, or none')
    torch.manual_seed(0)
    images = load_images(image_dir, num_images, size)
    return {name: erf(build_backbone(name, checkpoints[i] if checkpoints else None), images)
            for i, name in enumerate(models)}
