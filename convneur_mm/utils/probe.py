"""Train a small ConvNeur on the global-context probe, in a plain PyTorch loop.

The probe (``convneur_mm.demo_data.global_probe``) asks whether two ringed
marks far apart have the same colour. This module trains one tiny backbone,
with its memory (``ours``) or without (``local``, the Table 5 local-only
row), on images made in memory, and reports validation accuracy: the
test suite's learning check and the measurements of docs/probe.md share it.
No MMEngine runner: seconds of start-up matter in a CI-sized run.

    python -m convneur_mm.utils.probe --variants ours local --seeds 0 1 2
"""
import argparse
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..demo_data.global_probe import make_image

# Two stages of one block: the local branch sees 4 + 24 + 4 + 48 = 80 pixels
# (stem, stage-1 7x7 at stride 4, downsampling, stage-2 7x7 at stride 8): less
# than the targets' distance (0.6 x 256 = 154) at size 256, not always at 128
# (77; docs/probe.md). The memory reads its chunks in raster order: a target
# reads what the rows above it wrote.
ARCH = dict(depths=[1, 1], dims=[16, 32], memory_dim=16)
MEMORY_CFG = dict(chunk_size=32)
# backbone switches of each variant: the memory, the local-only row of Table 5,
# and global self-attention in the same scaffold (a reference global mixer)
VARIANTS = {'ours': dict(memory_placement='stage'),
            'local': dict(memory_placement='none'),
            'attention': dict(global_mixer='attention')}
MEAN, STD = 80.0, 60.0  # pixel statistics of the probe, roughly


def probe_tensors(count: int, seed: int, size: int = 128, kinds: int = 3,
                  distractors: int = 2, relation: str = 'same') -> Tuple[Tensor, Tensor]:
    """``count`` normalized images (half of each class) and their labels."""
    labels = np.arange(count) % 2
    images = [make_image(np.random.default_rng([seed, i]), int(label), size=size,
                         kinds=kinds, distractors=distractors, relation=relation)[0]
              for i, label in enumerate(labels)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (x - MEAN) / STD, torch.from_numpy(labels)


def probe_data(seed: int, train_count: int = 3000, val_count: int = 500,
               **options) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val) of a seed: the same for every variant."""
    return (*probe_tensors(train_count, seed + 1000, **options),
            *probe_tensors(val_count, seed + 2000, **options))


def build_probe_model(variant: str, arch: Optional[dict] = None) -> nn.Module:
    """The backbone of ``variant`` (a key of VARIANTS) and a linear 2-way head."""
    from ..models import ConvNeur
    arch = dict(arch or ARCH)
    backbone = ConvNeur(arch=arch, memory_cfg=MEMORY_CFG, **VARIANTS[variant])
    backbone.init_weights()
    return nn.Sequential(backbone, _First(), nn.Linear(arch['dims'][-1], 2))


class _First(nn.Module):
    """The backbone's last-stage vector out of its tuple."""

    def forward(self, outs: Tuple[Tensor, ...]) -> Tensor:
        return outs[-1]


def _flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips: they keep the label."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 250) -> float:
    model.eval()
    hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
               for i in range(0, len(x), batch))
    return hits / len(x)


def train_probe(variant: str, seed: int = 0, steps: int = 300, batch: int = 64,
                lr: float = 3e-3, train_count: int = 3000, val_count: int = 500,
                data: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
                **data_options) -> Dict[str, float]:
    """Train ``variant`` from seed ``seed``; {val_acc, train_acc, seconds}.

    AdamW with a 10% warm-up and cosine decay; the data (made from
    ``seed + 1000`` unless given as (x_train, y_train, x_val, y_val)) do not
    change with the variant, so that two variants see the same images.
    """
    if data is None:
        data = probe_data(seed, train_count, val_count, **data_options)
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = build_probe_model(variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + np.cos(np.pi * s / steps))))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        index = torch.randint(len(x_train), (batch,), generator=generator)
        loss = F.cross_entropy(model(_flip(x_train[index], generator)), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    return dict(val_acc=accuracy(model, x_val, y_val),
                train_acc=accuracy(model, x_train[:val_count], y_train[:val_count]),
                seconds=seconds)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--seeds', nargs='+', type=int, default=[0])
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--train-count', type=int, default=3000)
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--kinds', type=int, default=3)
    parser.add_argument('--distractors', type=int, default=2)
    parser.add_argument('--relation', default='same')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import logging
    from mmengine.logging import MMLogger
    # not the init report of every parameter, per run
    MMLogger.get_instance('mmengine').setLevel(logging.WARNING)
    options = dict(size=args.size, kinds=args.kinds, distractors=args.distractors,
                   relation=args.relation)
    for seed in args.seeds:
        data = probe_data(seed, args.train_count, **options)
        for variant in args.variants:
            result = train_probe(variant, seed, args.steps, args.batch, args.lr, data=data)
            print(f'{variant:6s} seed {seed}: val {result["val_acc"]:.3f} train '
                  f'{result["train_acc"]:.3f} ({result["seconds"]:.0f} s)', flush=True)


if __name__ == '__main__':
    main()
