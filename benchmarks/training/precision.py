"""16-bit against float32 training: the same config trained from the same
seeds in each precision, their loss curves and top-1 side by side.

Each run is what ``tools/train.py CONFIG --seed S`` runs (``load_config``,
``set_randomness``, ``build_runner``), for ``iters`` iterations. 'bfloat16'
adds ``--amp --amp-dtype bfloat16`` (``enable_amp``: MMEngine's
AmpOptimWrapper on a GPU, bf16 autocast on a CPU) and takes the memory's
products in bf16 (``memory_cfg.operand_dtype``, as 'auto' does under CUDA bf16
autocast, so that a CPU run trains the same products). 'float16' (GPUs only)
is ``--amp`` as users run it: fp16 autocast with a dynamic loss scale, the
memory's products in float32 ('auto''s rule under fp16). Runs differ in
their precision and seed only; the same seed gives the same initial weights
and data order.

The default config is M1 on the embedded tiny ImageNet
(``configs/demo/cls_convneur_m1_imagenet_tiny.py``), 300 iterations at one
process's batch (its learning rate scaled to that batch, as
``--auto-scale-lr`` does), its cosine decay stretched over them (the warm-up
stays one epoch).

Each 16-bit precision is judged against float32 on two numbers per run
(``agreement``): the mean training loss over the last third of the
iterations (one iteration's loss carries Mixup's and CutMix's noise) and the
final top-1. For each, the gap between the two precisions' means over seeds
must not exceed the spread between seeds: float32's range (max - min over
seeds), what a change of seed alone does to the reference. The paired
differences (the same seed in both precisions) are reported beside it; the
loss curve is also reported in windows, each window with the same comparison.

    python -m benchmarks.run precision [--precisions float32 bfloat16]
        [--seeds 0 1 2] [--iters 300]
"""
import argparse
import gc
import math
import os
import os.path as osp
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

from convneur_mm.analysis.timing import setup_benchmark_device, time_call
from benchmarks.common.record import Record
from benchmarks.common.subjects import describe_error
from convneur_mm.apis.launch import (build_runner, check_data_paths, enable_amp, load_config,
                                     missing_data_paths, set_randomness)
from convneur_mm.testing.errors import least, worst
from convneur_mm.utils.cli import positive_int, writable_dir, writable_file
from convneur_mm.utils.tables import markdown_table

REFERENCE = 'float32'
PRECISIONS = (REFERENCE, 'bfloat16', 'float16')
DEFAULT_CONFIG = 'demo/cls_convneur_m1_imagenet_tiny.py'
DATA_ROOT_VARIABLE = 'IMAGENET_TINY_ROOT'  # the demo config's data root
DATA_LOADERS = ('train_dataloader', 'val_dataloader')  # what a run reads
DEFAULT_WINDOWS = 10
LOSS = 'loss'
TOP1 = 'accuracy/top1'
# the dry run: a few images per class and one iteration per epoch
DRY_ITERS, DRY_TRAIN_PER_CLASS, DRY_VAL_PER_CLASS = 2, 3, 1


def iterations_per_epoch(cfg) -> int:
    """Iterations of one epoch of the config's training data (one process,
    the last batch partial as the default sampler leaves it)."""
    from mmengine.registry import DATASETS, init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    loader = cfg.train_dataloader
    return math.ceil(len(DATASETS.build(loader.dataset)) / loader.batch_size)


def run_config(config: str, precision: str, seed: int, iters: int, work_dir: str,
               cfg_options: Optional[dict] = None):
    """The config of one run: ``config`` trained for ``iters`` iterations
    (rounded up to whole epochs; at least two, the schedule's warm-up epoch
    and its decay) in ``precision`` from ``seed``, validated every quarter
    of its epochs (rounded down) and at its end, no checkpoints, the loss
    logged every iteration, the learning rate scaled to one process's batch
    where the config names its base batch.

    Raises:
        ValueError: an unknown precision, float16 without a GPU, a config
            whose evaluation reports no top-1, or fewer than two epochs.
    """
    check_precision(precision)
    name = f'{precision}_seed{seed}'
    cfg = load_config(config, cfg_options, work_dir=osp.join(work_dir, name))
    evaluators = cfg.get('val_evaluator') or []
    if not any(e.get('type') in ('Accuracy', 'mmpretrain.Accuracy')
               for e in (evaluators if isinstance(evaluators, list) else [evaluators])):
        raise ValueError(f'{config} evaluates with {evaluators or "nothing"}: the precision '
                         f'comparison needs a classification config reporting {TOP1}')
    check_data_paths(cfg, DATA_LOADERS)  # says how to point at data
    per_epoch = iterations_per_epoch(cfg)
    epochs = math.ceil(iters / per_epoch)
    if epochs < 2:
        raise ValueError(f'{iters} iterations are {epochs} epoch of {per_epoch} iterations; '
                         'the schedule needs at least two epochs (warm-up, then decay): '
                         f'ask for at least {per_epoch + 1}')
    cfg.train_cfg.max_epochs = epochs
    if 'base_batch_size' in (cfg.get('auto_scale_lr') or {}):
        # --auto-scale-lr: the lr per image the config was tuned at, whatever
        # batch one process trains (the tiny demo's is half its base batch)
        cfg.auto_scale_lr.enable = True
    cfg.train_cfg.val_interval = max(1, epochs // 4)
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = None  # the figures are the result, not the weights
    cfg.experiment_name = name  # one MessageHub and logger per run in one process
    # the report is the output; each run's scalars stay in its work dir (vis_data)
    cfg.log_level = 'WARNING'
    if precision != REFERENCE:
        enable_amp(cfg, precision)
    if precision == 'bfloat16' and 'ConvNeur' in str(cfg.model.backbone.get('type')):
        # a new dict: ConfigDict.setdefault would store a copy of a given default
        cfg.model.backbone.memory_cfg = dict(cfg.model.backbone.get('memory_cfg') or {},
                                             operand_dtype='bfloat16')
    set_randomness(cfg, seed)
    return cfg


def train_run(cfg, device: str = 'cpu') -> Dict:
    """Trains ``cfg`` (``run_config``'s) and returns its loss at every
    iteration, its top-1 at every validation (with the iteration it followed)
    and its seconds."""
    runner = build_runner(cfg)
    seconds = time_call(runner.train, device)
    hub = runner.message_hub
    del runner  # its model and optimizer state, before the next run builds its own
    gc.collect()
    if device == 'cuda':
        torch.cuda.empty_cache()
    losses = [float(v) for v in hub.get_scalar(f'train/{LOSS}').data[0]]
    top1 = [float(v) for v in hub.get_scalar(f'val/{TOP1}').data[0]]
    per_epoch = len(losses) // cfg.train_cfg.max_epochs
    epochs = [e for e in range(1, cfg.train_cfg.max_epochs + 1)
              if e % cfg.train_cfg.val_interval == 0 or e == cfg.train_cfg.max_epochs]
    if len(top1) != len(epochs):
        raise RuntimeError(f'{len(top1)} validations recorded, expected {len(epochs)}')
    return dict(losses=losses, top1=top1, top1_iters=[e * per_epoch for e in epochs],
                seconds=seconds)


def _spread_and_gap(values: Dict[str, List[float]]) -> Dict:
    """Per precision (float32 and one other) its seeds' mean and range, and
    ``paired``: the other's value less float32's, seed by seed; the gap
    between the two means, and whether it is within float32's range."""
    # NaN-aware: a diverged seed's NaN must show in the range, not be skipped by max/min
    out = {p: dict(mean=sum(v) / len(v), range=worst(v) - least(v)) for p, v in values.items()}
    other = next(p for p in values if p != REFERENCE)
    gap = abs(out[REFERENCE]['mean'] - out[other]['mean'])
    spread = out[REFERENCE]['range']
    paired = [b - a for a, b in zip(values[REFERENCE], values[other])]
    return dict(out, paired=paired, gap=gap, spread=spread, within=gap <= spread)


def agreement(runs: Sequence[Dict], windows: int = DEFAULT_WINDOWS) -> Dict:
    """Whether each 16-bit precision trains as float32 does, from
    ``train_run``'s results (each with its ``precision`` and ``seed``).

    Args:
        runs: float32 and one or more other precisions, each at the same two
            or more seeds, each (precision, seed) once, all as long.
        windows: the loss curve's windows (consecutive iterations averaged).

    Returns:
        ``against_float32``, per other precision: ``late_loss`` (mean loss
        over the last third of the iterations) and ``top1`` (the final
        one), each with both precisions' means and ranges over seeds, the
        ``paired`` differences seed by seed (the other less float32), the
        ``gap`` between the means, the ``spread`` (float32's range) and
        ``within``; ``curve``: the same per window; ``agree``: both numbers
        within. ``agree`` at the top: every precision agrees.

    Raises:
        ValueError: runs that do not pair up as above.
    """
    seeds = {p: sorted(r['seed'] for r in runs if r['precision'] == p)
             for p in dict.fromkeys(r['precision'] for r in runs)}
    if REFERENCE not in seeds or len(seeds) < 2:
        raise ValueError(f'need float32 and another precision, got {sorted(seeds)}')
    if any(s != seeds[REFERENCE] for s in seeds.values()):
        raise ValueError(f'every precision must run the same seeds, got {seeds}')
    check_seeds(seeds[REFERENCE])
    lengths = {len(r['losses']) for r in runs}
    if len(lengths) != 1:
        raise ValueError(f'runs of different lengths: {sorted(lengths)} iterations')
    iters = lengths.pop()
    if not 1 <= windows <= iters:
        raise ValueError(f'windows must be in [1, {iters}], got {windows}')

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    def compare(precision: str) -> Dict:
        def by_seed(value: Callable[[Dict], float]) -> Dict:
            return _spread_and_gap({p: [value(r) for r in runs if r['precision'] == p]
                                    for p in (REFERENCE, precision)})

        curve = []
        for w in range(windows):
            start, stop = w * iters // windows, (w + 1) * iters // windows
            curve.append(dict(by_seed(lambda r: mean(r['losses'][start:stop])),
                              iters=[start + 1, stop]))
        late = iters - max(1, iters // 3)
        late_loss = by_seed(lambda r: mean(r['losses'][late:]))
        top1 = by_seed(lambda r: r['top1'][-1])
        return dict(late_loss=late_loss, top1=top1, curve=curve,
                    agree=late_loss['within'] and top1['within'])

    against = {p: compare(p) for p in seeds if p != REFERENCE}
    return dict(iters=iters, seeds=seeds[REFERENCE], against_float32=against,
                agree=all(c['agree'] for c in against.values()))


def _data_root(config: str, work_dir: str, dry_run: bool) -> Optional[str]:
    """Where the runs read the tiny ImageNet from, when it is generated here
    (None: where the config says). The dry run's is a handful of images; the
    default config's is generated whole into ``work_dir`` when its root is
    not there, as the classification demo does."""
    from convneur_mm.demo_data.imagenet import generate_imagenet_tiny
    if dry_run:
        sizes = dict(train_per_class=DRY_TRAIN_PER_CLASS, val_per_class=DRY_VAL_PER_CLASS)
    elif (config == DEFAULT_CONFIG and DATA_ROOT_VARIABLE not in os.environ
          and missing_data_paths(load_config(config), DATA_LOADERS)):
        sizes = {}
    else:
        return None
    root = osp.join(work_dir, 'imagenet_tiny')
    generate_imagenet_tiny(root, **sizes)
    return root


def check_precision(precision: str) -> None:
    """A known precision; float16 only where a GPU trains (CPU autocast is
    bf16 only)."""
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    if precision == 'float16' and not torch.cuda.is_available():
        raise ValueError('float16 trains on a GPU only (CPU autocast is bfloat16)')


def check_precisions(precisions: Sequence[str]) -> None:
    """float32 and at least one other known precision, each once."""
    for precision in precisions:
        check_precision(precision)
    if len(set(precisions)) != len(precisions):
        raise ValueError(f'a precision is named twice: {list(precisions)}')
    if REFERENCE not in precisions or len(precisions) < 2:
        raise ValueError(f'need float32 and another precision, got {list(precisions)}')


def check_seeds(seeds: Sequence[int]) -> None:
    """At least two seeds, each once: the spread between seeds is the yardstick."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f'need two or more distinct seeds, got {list(seeds)}')


def run(config: str = DEFAULT_CONFIG, precisions: Sequence[str] = (REFERENCE, 'bfloat16'),
        seeds: Sequence[int] = (0, 1, 2), iters: int = 300,
        work_dir: str = 'work_dirs/precision_training', windows: Optional[int] = None,
        dry_run: bool = False, on_run: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Every (precision, seed) run of ``config``, then ``agreement``. Runs
    train where MMEngine trains: on the GPU where there is one.

    Every config is built before the first run trains, so that a bad
    config stops the call at its start. A run that raises is recorded
    (``error``) and the next one trains; ``agreement`` is then None.
    ``windows``: default ``DEFAULT_WINDOWS``, or one per iteration if fewer.
    The default config's tiny ImageNet is generated into ``work_dir`` where
    it is missing (``_data_root``; the loaders' ``data_root`` set to it).
    ``dry_run``: a handful of its images (one batch per epoch) for
    ``DRY_ITERS`` iterations: a check, not a result. ``on_run`` gets each
    run's result as it ends.
    """
    check_precisions(precisions)
    check_seeds(seeds)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    setup_benchmark_device(device)  # on CUDA float32 is float32: TF32 off
    if dry_run:
        iters, windows = DRY_ITERS, None
    data_root = _data_root(config, work_dir, dry_run)
    windows = windows or min(DEFAULT_WINDOWS, iters)
    if windows > iters:  # a run trains at least ``iters``: refused before any trains
        raise ValueError(f'windows must be at most the {iters} iterations, got {windows}')
    roots = None if data_root is None else {f'{loader}.dataset.data_root': data_root
                                            for loader in DATA_LOADERS}
    configs = {(seed, precision): run_config(config, precision, seed, iters, work_dir, roots)
               for seed in seeds for precision in precisions}
    runs = []
    for (seed, precision), cfg in configs.items():
        result = dict(precision=precision, seed=seed)
        try:
            result.update(train_run(cfg, device))
        except Exception as e:  # recorded: the other runs' figures still count
            result['error'] = describe_error(e)
        runs.append(result)
        if on_run is not None:
            on_run(result)
    failed = any('error' in r for r in runs)
    return dict(config=config, device=device, torch=torch.__version__, dry=dry_run,
                runs=runs, agreement=None if failed else agreement(runs, windows))


def format_report(result: Dict) -> str:
    """The per-run table, then per 16-bit precision the two numbers'
    comparison with float32 and the curve's."""
    runs = [(r['precision'], r['seed'], r['error'], '-', '-', '-') if 'error' in r else
            (r['precision'], r['seed'], f'{r["losses"][0]:.3f}', f'{r["losses"][-1]:.3f}',
             f'{r["top1"][-1]:.1f}', f'{r["seconds"]:.0f}') for r in result['runs']]
    a = result['agreement']
    lines = [f'{result["config"]} on {result["device"]}, torch {result["torch"]}'
             + ('' if a is None else f', {a["iters"]} iterations, seeds {a["seeds"]}')
             + ('; dry run' if result['dry'] else ''),
             markdown_table(('precision', 'seed', 'first loss', 'last loss', 'top-1', 's'),
                            runs)]
    if a is None:
        failed = sum('error' in r for r in result['runs'])
        return '\n'.join(lines + ['', f'no verdict: {failed} of {len(runs)} runs failed'])
    for precision, c in a['against_float32'].items():
        def row(name: str, x: Dict, digits: int) -> tuple:
            f = f'{{:.{digits}f}}'
            return (name, *(f'{f.format(x[p]["mean"])} ± {f.format(x[p]["range"] / 2)}'
                            for p in (REFERENCE, precision)),
                    ', '.join(f'{d:+.{digits}f}' for d in x['paired']),
                    f.format(x['gap']), f.format(x['spread']), 'yes' if x['within'] else 'NO')

        header = ('', 'float32 (mean ± half range)', precision, 'per seed', 'gap',
                  'spread (float32)', 'within')
        curve = [row(f'loss, iterations {w["iters"][0]}-{w["iters"][1]}', w, 3)
                 for w in c['curve']]
        lines += ['', markdown_table(header, [row('loss, last third', c['late_loss'], 3),
                                              row('top-1, final', c['top1'], 2)]),
                  '', markdown_table(header, curve), '',
                  f'{precision} ' + ('agrees with' if c['agree'] else 'does NOT agree with')
                  + ' float32 within the spread between seeds']
    return '\n'.join(lines)


def plot_curves(result: Dict, figure: str, smooth: int = 15) -> None:
    """Every run's loss (a moving mean over ``smooth`` iterations) and its
    top-1 at each validation, one colour per precision, into ``figure``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colours = dict(zip(PRECISIONS, ('tab:blue', 'tab:orange', 'tab:green')))
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for r in result['runs']:
        losses = r['losses']
        k = max(1, min(smooth, len(losses)))
        moving = [sum(losses[i - k + 1:i + 1]) / k for i in range(k - 1, len(losses))]
        label = r['precision'] if r['seed'] == result['agreement']['seeds'][0] else None
        style = dict(color=colours[r['precision']], alpha=0.8, label=label)
        loss_ax.plot(range(k, len(losses) + 1), moving, **style)
        top1_ax.plot(r['top1_iters'], r['top1'], marker='o', **style)
    loss_ax.set(xlabel='iteration', ylabel=f'training loss (mean of {k})')
    top1_ax.set(xlabel='iteration', ylabel='validation top-1 (%)')
    loss_ax.legend()
    fig.suptitle(f'{osp.basename(result["config"])}: one line per seed, '
                 f'{len(result["agreement"]["seeds"])} seeds ({result["device"]})')
    fig.tight_layout()
    fig.savefig(figure)
    plt.close(fig)


def _checked_by(check: Callable[[Sequence], None]) -> type:
    """An argparse action that hands a list option to ``check``: its
    ValueError is a usage error at start (exit 2)."""

    class Checked(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            try:
                check(values)
            except ValueError as e:
                parser.error(f'argument {option_string}: {e}')
            setattr(namespace, self.dest, values)

    return Checked


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This case's options (the runner adds ``--dry-run`` and ``--json``)."""
    parser.add_argument('--config', default=DEFAULT_CONFIG,
                        help='a classification config (default: M1 on the tiny ImageNet)')
    parser.add_argument('--precisions', nargs='+', default=[REFERENCE, 'bfloat16'],
                        action=_checked_by(check_precisions), metavar='PRECISION',
                        help=f'float32 and the 16-bit ones to judge against it, of '
                        f'{PRECISIONS} (float16: GPUs only)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2],
                        action=_checked_by(check_seeds),
                        help='each precision trains from each seed (two or more)')
    parser.add_argument('--iters', type=positive_int, default=300,
                        help='iterations of each run (rounded up to whole epochs)')
    parser.add_argument('--windows', type=positive_int,
                        help=f"the loss curve's windows in the report (default "
                        f"{DEFAULT_WINDOWS}, or one per iteration if fewer)")
    parser.add_argument('--work-dir', type=writable_dir, default='work_dirs/precision_training',
                        help="the runs' logs and scalars, one folder per run")
    parser.add_argument('--figure', type=writable_file, metavar='PATH',
                        help='also plot every run\'s loss and top-1 there (.png)')


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``run`` with the parsed options; prints the report; exit code 1 where
    a run failed or a precision does not agree (a dry run's verdict is no
    result: exit 0)."""
    done: List[Dict] = []

    def print_run(r: Dict) -> None:
        print(f'{r["precision"]} seed {r["seed"]}: ' + (r['error'] if 'error' in r else
              f'loss {r["losses"][0]:.3f} -> {r["losses"][-1]:.3f}, top-1 '
              f'{r["top1"][-1]:.1f}, {r["seconds"]:.0f} s'), file=sys.stderr, flush=True)
        done.append(r)
        record.write(dict(runs=done, partial=True))  # a run cut short keeps the runs it trained

    result = run(args.config, args.precisions, args.seeds, args.iters, args.work_dir, args.windows,
                 dry_run=args.dry_run, on_run=print_run)
    print(format_report(result))
    a = result['agreement']
    if args.figure and a is not None:
        plot_curves(result, args.figure)
    # a failed run is a failure, dry or not; a dry run's verdict is no result
    if a is None or (not a['agree'] and not args.dry_run):
        result['exit_code'] = 1
    return result
