"""Effective receptive field maps (the OverLoCK paper's Figure 2 protocol).

    python tools/analysis_tools/effective_receptive_field.py
        [--models ConvNeur-M3 ConvNeXt-V2-P] [--checkpoints CKPT ...]
        [--images DIR] [--num-images 16] [--size 512] [--out erf.png]

Following RepLKNet / OverLoCK: for each image, the central point of the last
stage's feature map (ReLU, summed over channels) is back-propagated to the input;
the absolute input gradients, summed over colour channels, are averaged over
the images, then shown as log10(1 + x) normalized to [0, 1]. We also print
the share of the image area that holds 20/50/90% of the total contribution
(larger = the model reaches further). Without checkpoints the weights are
random: the map then shows what the architecture can reach at initialization.
"""
import argparse
import glob
import os.path as osp
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch

import convneur_mm  # noqa: F401
from convneur_mm.apis.toolbox import quiet_init
from convneur_mm.utils.tables import markdown_table

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


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['ConvNeur-M3', 'ConvNeXt-V2-P'],
                        choices=list(BACKBONES))
    parser.add_argument('--checkpoints', nargs='*', default=[],
                        help='one per model (backbone. keys are used), or none')
    parser.add_argument('--images', help='directory of images (default: random images)')
    parser.add_argument('--num-images', type=int, default=16)
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--out', default='erf.png')
    return parser.parse_args()


def build_backbone(name: str, checkpoint: Optional[str]) -> torch.nn.Module:
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


def render(maps: Dict[str, np.ndarray], path: str) -> None:
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


def main():
    args = parse_args()
    if args.checkpoints and len(args.checkpoints) != len(args.models):
        raise ValueError('give one checkpoint per model, or none')
    torch.manual_seed(0)
    images = load_images(args.images, args.num_images, args.size)
    maps, rows = {}, []
    for i, name in enumerate(args.models):
        ckpt = args.checkpoints[i] if args.checkpoints else None
        maps[name] = erf(build_backbone(name, ckpt), images)
        rows.append([name] + [f'{100 * s:.3g}%' for s in area_shares(maps[name]).values()])
    print(markdown_table(('model', 'area for 20%', '50%', '90% of the contribution'), rows))
    render(maps, args.out)
    print(f'wrote {args.out}')  # as given: a report must not carry this machine's paths


if __name__ == '__main__':
    main()
