"""Train a small ConvNeur on the global-context probe, in a plain PyTorch loop.

The probe (``projects.global_probe.probe.data``) asks whether two ringed
marks far apart have the same colour (or, with ``--relation above``, whether
the red mark is the upper one). This module trains one tiny backbone,
with its memory (``ours``) or without (``local``, the Table 5 local-only
row), on images made in memory, and reports validation accuracy: the
test suite's learning check and the measurements of projects/global_probe/README.md share it.
No MMEngine runner: seconds of start-up matter in a CI-sized run.

    python -m projects.global_probe.probe.train --variants ours local --seeds 0 1 2
"""
import argparse
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import ALL_RELATIONS, make_image
from convneur_mm.models.layers.block import FUSIONS
from convneur_mm.models.layers.mixers import MIXERS
from convneur_mm.analysis.timing import PeakMemoryGrowth
from convneur_mm.utils.cli import positive_float, positive_int

# Two stages of one block: the local branch sees 4 + 24 + 4 + 48 = 80 pixels
# (stem, stage-1 7x7 at stride 4, downsampling, stage-2 7x7 at stride 8): less
# than the targets' distance (0.6 x 256 = 154) at size 256, not always at 128
# (77; projects/global_probe/README.md). The memory reads its chunks in raster order: a target
# reads what the rows above it wrote.
ARCH = dict(depths=[1, 1], dims=[16, 32], memory_dim=16)
MEMORY_CFG = dict(chunk_size=32)
# backbone switches of each variant: the rows of Table 5 (docs/advanced_guides/ablations.md):
# ours, local-only, per-layer memory, every other global-branch type in the
# same scaffold, and every other fusion
VARIANTS = {'ours': dict(memory_placement='stage'),
            'local': dict(memory_placement='none'),
            'per_layer': dict(memory_placement='block'),
            **{mixer: dict(global_mixer=mixer) for mixer in MIXERS if mixer != 'memory'},
            **{fusion: dict(fusion=fusion) for fusion in FUSIONS if fusion != 'gate'}}
MEAN, STD = 80.0, 60.0  # pixel statistics of the probe, roughly


def probe_tensors(count: int, seed: int, size: int = 128, kinds: int = 3,
                  distractors: int = 2, relation: str = 'same',
                  **marks) -> Tuple[Tensor, Tensor]:
    """``count`` normalized images (half of each class) and their labels;
    ``marks``: make_image's ``radius_range``, ``target_min_dist``, ``border``
    and ``aspect``."""
    labels = np.arange(count) % 2
    images = [make_image(np.random.default_rng([seed, i]), int(label), size=size,
                         kinds=kinds, distractors=distractors, relation=relation,
                         **marks)[0]
              for i, label in enumerate(labels)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (x - MEAN) / STD, torch.from_numpy(labels)


def probe_data(seed: int, train_count: int = 3000, val_count: int = 500,
               **options) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val) of a seed: the same for every variant."""
    return (*probe_tensors(train_count, seed + 1000, **options),
            *probe_tensors(val_count, seed + 2000, **options))


# the local branch's operations that pool over the whole map (projects/global_probe/README.md,
# "Local-only is not local"), removable to measure what they contribute
GLOBAL_POOLINGS = ('grn', 'final_norm')


def build_probe_model(variant: str, arch: Optional[dict] = None,
                      memory_cfg: Optional[dict] = None, placement: Optional[str] = None,
                      without: Sequence[str] = ()) -> nn.Module:
    """The backbone of ``variant`` (a key of VARIANTS) and a linear 2-way head.

    ``placement`` overrides a memory variant's ``memory_placement``;
    ``without`` (a subset of GLOBAL_POOLINGS) replaces every GRN, or the
    norm after global average pooling, by the identity.
    """
    from convneur_mm.models import ConvNeur
    from convneur_mm.models.layers.local_branch import GRN
    unknown = set(without) - set(GLOBAL_POOLINGS)
    if unknown:
        raise ValueError(f'without: {sorted(unknown)} not in {GLOBAL_POOLINGS}')
    arch = dict(arch or ARCH)
    switches = dict(VARIANTS[variant])
    if placement is not None and variant != 'local':
        switches['memory_placement'] = placement
    backbone = ConvNeur(arch=arch, memory_cfg=memory_cfg or MEMORY_CFG, **switches)
    backbone.init_weights()
    for name, module in list(backbone.named_modules()):
        final_norm = name.startswith('norm') and '.' not in name
        if ('grn' in without and isinstance(module, GRN)) or (
                'final_norm' in without and final_norm):
            parent, _, child = name.rpartition('.')
            setattr(backbone.get_submodule(parent) if parent else backbone, child,
                    nn.Identity())
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
                model_options: Optional[dict] = None, log_every: int = 0,
                **data_options) -> Dict[str, float]:
    """Train ``variant`` from seed ``seed``; {val_acc, train_acc, seconds,
    step_mb}: step_mb is the peak memory that one training step adds.

    AdamW with a 10% warm-up and cosine decay; the data (made from
    ``seed + 1000`` unless given as (x_train, y_train, x_val, y_val)) do not
    change with the variant, so that two variants see the same images.
    ``model_options``: build_probe_model's keywords; ``log_every``: print the
    validation accuracy every so many steps.
    """
    if data is None:
        data = probe_data(seed, train_count, val_count, **data_options)
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = build_probe_model(variant, **(model_options or {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + np.cos(np.pi * s / steps))))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    step_mb = 0.0
    for step in range(1, steps + 1):
        model.train()
        index = torch.randint(len(x_train), (batch,), generator=generator)
        if step == 2:  # the optimizer's state exists from step 1 on
            peak = PeakMemoryGrowth('cpu')
        loss = F.cross_entropy(model(_flip(x_train[index], generator)), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == 2:
            step_mb = peak.mib()
        if log_every and step % log_every == 0 and step < steps:
            print(f'  {variant} step {step}: loss {loss.item():.3f} val '
                  f'{accuracy(model, x_val, y_val):.3f}', flush=True)
    seconds = time.perf_counter() - start
    return dict(val_acc=accuracy(model, x_val, y_val),
                train_acc=accuracy(model, x_train[:val_count], y_train[:val_count]),
                seconds=seconds, step_mb=step_mb)


RESULT_LINE = re.compile(
    r'^(?P<variant>\w+)\s+seed (?P<seed>\d+)(?: size (?P<size>\d+))?: '
    r'val (?P<val_acc>[\d.]+) train (?P<train_acc>[\d.]+) '
    r'\((?P<seconds>[\d.]+) s, (?P<ms_per_step>[\d.]+) ms/step, '
    r'step peak (?P<step_mb>[\d.]+) MiB\)$')


def result_line(variant: str, seed: int, result: Dict[str, float], steps: int,
                size: Optional[int] = None) -> str:
    """What ``main`` prints per run (``size``: the image side, when known);
    ``parse_result_line`` reads it back."""
    where = f' size {size}' if size is not None else ''
    return (f'{variant:6s} seed {seed}{where}: val {result["val_acc"]:.3f} train '
            f'{result["train_acc"]:.3f} ({result["seconds"]:.0f} s, '
            f'{1000 * result["seconds"] / steps:.0f} ms/step, step peak '
            f'{result["step_mb"]:.0f} MiB)')


def parse_result_line(line: str) -> Optional[dict]:
    """{variant, seed, size, val_acc, train_acc, seconds, ms_per_step, step_mb}
    of a result line (size None in lines that do not name it), None for any
    other line (logs hold warnings too)."""
    match = RESULT_LINE.match(line.strip())
    if match is None:
        return None
    row = {k: float(v) for k, v in match.groupdict().items()
           if k not in ('variant', 'size')}
    row['seed'] = int(row['seed'])
    row['size'] = int(match['size']) if match['size'] else None
    return dict(row, variant=match['variant'])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--seeds', nargs='+', type=int, default=[0])
    parser.add_argument('--steps', type=positive_int, default=300)
    parser.add_argument('--batch', type=positive_int, default=64)
    parser.add_argument('--lr', type=positive_float, default=3e-3)
    parser.add_argument('--train-count', type=positive_int, default=3000)
    parser.add_argument('--size', type=positive_int, default=128)
    parser.add_argument('--kinds', type=positive_int, default=3)
    parser.add_argument('--distractors', type=int, default=2)
    parser.add_argument('--relation', default='same', choices=ALL_RELATIONS)
    parser.add_argument('--radius', type=float, nargs=2, metavar=('LO', 'HI'),
                        help='disc radii as fractions of the side (default 0.07 0.1)')
    parser.add_argument('--min-dist', type=float,
                        help="the targets' least distance (in y for 'above') as a "
                             'fraction of the side (0.6)')
    parser.add_argument('--border', type=float,
                        help="every mark's least distance from the image's edge, as a "
                             'fraction of the side (0)')
    parser.add_argument('--aspect', type=float,
                        help="'above' only: marks as ellipses this many times wider than "
                             'high (1)')
    parser.add_argument('--depths', type=positive_int, nargs='+', help='blocks per stage (1 1)')
    parser.add_argument('--dims', type=positive_int, nargs='+', help='widths per stage (16 32)')
    parser.add_argument('--memory-dim', type=positive_int, help='C_m (16)')
    parser.add_argument('--chunk-size', type=positive_int, help='memory chunk length (32)')
    parser.add_argument('--placement', choices=('stage', 'block'),
                        help="a memory variant's memory_placement (stage)")
    parser.add_argument('--without', nargs='+', default=[], choices=GLOBAL_POOLINGS,
                        help='replace every GRN / the final norm by the identity')
    parser.add_argument('--log-every', type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import logging
    from mmengine.logging import MMLogger
    # not the init report of every parameter, per run
    MMLogger.get_instance('mmengine').setLevel(logging.WARNING)
    options = dict(size=args.size, kinds=args.kinds, distractors=args.distractors,
                   relation=args.relation)
    for key, value in (('radius_range', args.radius and tuple(args.radius)),
                       ('target_min_dist', args.min_dist), ('border', args.border),
                       ('aspect', args.aspect)):
        if value:
            options[key] = value
    arch = dict(ARCH)
    for key, value in (('depths', args.depths), ('dims', args.dims),
                       ('memory_dim', args.memory_dim)):
        if value:
            arch[key] = value
    memory_cfg = dict(MEMORY_CFG, **({'chunk_size': args.chunk_size} if args.chunk_size else {}))
    model_options = dict(arch=arch, memory_cfg=memory_cfg, placement=args.placement,
                         without=args.without)
    for seed in args.seeds:
        data = probe_data(seed, args.train_count, **options)
        for variant in args.variants:
            result = train_probe(variant, seed, args.steps, args.batch, args.lr, data=data,
                                 model_options=model_options, log_every=args.log_every)
            print(result_line(variant, seed, result, args.steps, args.size), flush=True)


if __name__ == '__main__':
    main()
