"""Seeds of a demo: its first epochs trained from each seed, for each variant
of its model, one run after another, as a user launches them.

Each run is ``tools/dist_train.sh CONFIG 2 [--auto-scale-lr] --cfg-options
train_cfg.max_epochs=N randomness.seed=S default_hooks.logger.interval=1
custom_hooks.0.log_group_norms=True`` plus the variant's options, in a work
dir of its own. The variants of a ConvNeur demo: ``autograd`` and
``closed_form`` (the memory's two backwards; the closed form is the default)
and ``local`` (no global branch); the detection demo also trains ``convnextv2_pico``, its
backbone swapped for MMPretrain's ConvNeXt-V2-P. ``--no-clip`` drops the
config's gradient clipping. From each run's output it keeps the logged loss
at each epoch's end (MMEngine's running mean over its log processor's
window), the first iteration with a non-finite loss or gradient, the exit
status and ``NonFiniteStopHook``'s message with the module group it names.
``--evaluate`` trains the config's whole schedule instead, tests each run
that trained and checks its metrics against the demo's acceptance band.

``--plot DIVERGING HEALTHY`` draws instead the gradient norm of each module
group per iteration of two runs already trained, from their ``scalars.json``.

    python -m benchmarks.run seeds [--demo detection] [--seeds 0 1 ...]
        [--variants autograd closed_form local] [--length 3] [--no-clip] [--evaluate]
    python -m benchmarks.run seeds --plot DIVERGING_RUN HEALTHY_RUN --figure grad_norms.png
"""
import argparse
import glob
import importlib.util
import json
import math
import os
import os.path as osp
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from benchmarks.common.launch import launch_env
from benchmarks.common.record import Record, UsageError
from convneur_mm.engine.finite_check import NonFiniteTrainingError
from convneur_mm.utils.cli import positive_int, writable_dir, writable_file
from convneur_mm.utils.paths import config_path, tools_dir
from convneur_mm.utils.tables import markdown_table

if TYPE_CHECKING:  # a type only: the config module loads when a config does
    from mmengine.config import Config


@dataclass(frozen=True)
class Demo:
    """A demo the case trains: its config and how it gets its tiny data.

    Args:
        config: the demo's config under the shipped configs.
        data_variable: the environment variable the config reads its data root from.
        data_root: the root where the variable is unset (the config's default).
        generator: the module whose ``python -m`` writes the tiny dataset.
        data_marker: the file the generator writes last, under the root.
        by_epoch: the schedule counts epochs (else iterations).
        length: the default length of a run, in the schedule's unit.
        report_every: an iteration-based run's loss is reported every so many iterations.
        auto_scale_lr: the demo trains with ``--auto-scale-lr``.
        peers: other backbones the demo can train instead of its ConvNeur,
            by variant name: the options that swap it in.
    """
    config: str
    data_variable: str
    data_root: str
    generator: str
    data_marker: str
    by_epoch: bool = True
    length: int = 3
    report_every: int = 0
    auto_scale_lr: bool = True
    peers: Dict[str, Tuple[str, ...]] = field(default_factory=dict, hash=False)


# ConvNeXt-V2-P (MMPretrain's, from scratch): the local branch's own network,
# without the memory, as a peer; its widths are M3's, so the detector's neck fits.
CONVNEXTV2_PICO = ('model.backbone._delete_=True', 'model.backbone.type=mmpretrain.ConvNeXt',
                   'model.backbone.arch=pico', 'model.backbone.use_grn=True',
                   'model.backbone.layer_scale_init_value=0.',
                   'model.backbone.out_indices=[0,1,2,3]', 'model.backbone.drop_path_rate=0.1',
                   'model.backbone.gap_before_final_norm=False')

DEMOS: Dict[str, Demo] = {
    'detection': Demo('demo/cascade_rcnn_convneur_m3_coco_tiny.py', 'COCO_TINY_ROOT',
                      'data/coco_tiny/', 'convneur_mm.demo_data.coco',
                      'annotations/instances_val2017.json',
                      peers={'convnextv2_pico': CONVNEXTV2_PICO}),
    'segmentation': Demo('demo/fpn_convneur_m2_ade20k_tiny.py', 'ADE20K_TINY_ROOT',
                         'data/ade20k_tiny/', 'convneur_mm.demo_data.ade20k',
                         'sceneCategories.txt', by_epoch=False, length=80, report_every=20,
                         auto_scale_lr=False),
    'classification': Demo('demo/cls_convneur_m1_imagenet_tiny.py', 'IMAGENET_TINY_ROOT',
                           'data/imagenet_tiny', 'convneur_mm.demo_data.imagenet',
                           'meta/val.txt'),
}

# every demo's backbone is a ConvNeur: the same three variants serve them all
# (a demo's peers add theirs)
VARIANTS: Dict[str, Tuple[str, ...]] = {
    'autograd': ('model.backbone.memory_cfg.backward=autograd', ),
    'closed_form': ('model.backbone.memory_cfg.backward=closed_form', ),
    'local': ('model.backbone.memory_placement=none', ),
}
NO_CLIP = 'optim_wrapper.clip_grad=None'
PROCESSES = 2
HOOK = 'NonFiniteStopHook'
# the demos write a ~0.5 GB checkpoint at the end: a sweep keeps only what it measures
NO_CHECKPOINT = 'default_hooks.checkpoint=None'

_EPOCH_LINE = re.compile(r'Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/(\d+)\]\s+(.*)')
_ITER_LINE = re.compile(r'Iter\(train\)\s*\[\s*(\d+)/(\d+)\]\s+(.*)')
_LOGGED = re.compile(r'(\S+): (\S+)')
_STOP = re.compile(NonFiniteTrainingError.__name__ + r': (non-finite training at iteration '
                   r'(\d+).*)')
_GROUP = re.compile(r"first non-finite gradient in group '([^']+)'")


def run_options(demo: Demo, variant: str, seed: int, length: Optional[int], clip: bool = True,
                extra: Sequence[str] = (), checkpoint: bool = False) -> List[str]:
    """The ``--cfg-options`` of one run, as ``key=value`` words.

    Args:
        demo: the demo trained.
        variant: a name in ``VARIANTS`` or the demo's ``peers``.
        seed: ``randomness.seed``.
        length: epochs (iterations for an iteration-based demo) to train;
            None: the config's schedule.
        clip: keep the config's gradient clipping.
        extra: more options, last (they win).
        checkpoint: keep the config's checkpoints.
    """
    unit = 'max_epochs' if demo.by_epoch else 'max_iters'
    options = [] if length is None else [f'train_cfg.{unit}={length}']
    options += [f'randomness.seed={seed}', 'default_hooks.logger.interval=1',
                'custom_hooks.0.log_group_norms=True']
    options += [] if checkpoint else [NO_CHECKPOINT]
    options += [] if clip else [NO_CLIP]
    return options + list(variant_options(demo, variant)) + list(extra)


def variant_options(demo: Demo, variant: str) -> Tuple[str, ...]:
    """The options that make ``variant`` of ``demo``'s model.

    Args:
        demo: the demo trained.
        variant: a name in ``VARIANTS`` or the demo's ``peers``.

    Raises:
        ValueError: a variant neither a ConvNeur variant nor one of the demo's peers.
    """
    known = {**VARIANTS, **demo.peers}
    if variant not in known:
        raise ValueError(f'{demo.config}: variant must be one of {list(known)}, got {variant!r}')
    return known[variant]


def all_variants() -> List[str]:
    """Every variant some demo trains: the ConvNeur ones, then the peers."""
    peers = [p for demo in DEMOS.values() for p in demo.peers]
    return list(VARIANTS) + list(dict.fromkeys(peers))


def run_command(demo: Demo, work_dir: str, options: Sequence[str],
                processes: int = PROCESSES) -> List[str]:
    """``tools/dist_train.sh`` on the demo's config with ``options``, into ``work_dir``."""
    command = [osp.join(tools_dir(), 'dist_train.sh'), config_path(demo.config),
               str(processes), '--work-dir', work_dir]
    command += ['--auto-scale-lr'] if demo.auto_scale_lr else []
    return command + ['--cfg-options', *options]


def test_command(demo: Demo, checkpoint: str, work_dir: str, options: Sequence[str],
                 processes: int = PROCESSES) -> List[str]:
    """``tools/dist_test.sh`` on the demo's config and ``checkpoint`` with the
    variant's model ``options``, into ``work_dir``."""
    command = [osp.join(tools_dir(), 'dist_test.sh'), config_path(demo.config), checkpoint,
               str(processes), '--work-dir', work_dir]
    return command + (['--cfg-options', *options] if options else [])


def band_checker() -> ModuleType:
    """``tools/demo/check_band.py`` (a script, not a module): the demos' bands
    and how a test log's metrics are read."""
    path = osp.join(tools_dir(), 'demo', 'check_band.py')
    spec = importlib.util.spec_from_file_location('convneur_check_band', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_options(demo: Demo, options: Sequence[str]) -> 'Config':
    """Loads the config with ``options`` as tools/train.py does, checks that
    ``custom_hooks.0`` is the hook whose group norms the runs log, and
    returns the config.

    Raises:
        ValueError: the config's first custom hook is not ``NonFiniteStopHook``.
    """
    from convneur_mm.apis.launch import add_launch_arguments, load_config
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    cfg = load_config(demo.config, parser.parse_args(['--cfg-options', *options]).cfg_options)
    hooks = cfg.get('custom_hooks') or [{}]
    if not str(hooks[0].get('type', '')).endswith(HOOK):
        raise ValueError(f'{demo.config}: custom_hooks.0 is {hooks[0].get("type")!r}, not '
                         f'{HOOK}: the runs would not log their group norms')
    return cfg


def _loss(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


class RunLog(NamedTuple):
    """What a run's output says: the logged loss at each reported iteration
    (``marks``), the last logged iteration, the first iteration whose loss or
    gradient is non-finite, and ``NonFiniteStopHook``'s message and group."""
    losses: List[float]
    marks: List[int]
    last_iteration: Optional[int]
    first_nonfinite: Optional[int]
    stop_message: Optional[str]
    stop_group: Optional[str]


def parse_log(text: str, report_every: int = 0) -> RunLog:
    """Reads a training's output (``tools/dist_train.sh``'s, rank 0's log lines
    and every rank's traceback).

    Args:
        text: the output.
        report_every: 0 for an epoch-based run (the loss at each epoch's end),
            else the iterations between reported losses of an iteration-based one.
    """
    losses, marks, last, first_bad = [], [], None, None
    for line in text.splitlines():
        epoch = _EPOCH_LINE.search(line)
        step = _ITER_LINE.search(line) if epoch is None else None
        if epoch:
            ep, it, per_epoch, rest = int(epoch[1]), int(epoch[2]), int(epoch[3]), epoch[4]
            iteration, reported = (ep - 1) * per_epoch + it, it == per_epoch
        elif step:
            iteration, rest = int(step[1]), step[3]
            reported = report_every > 0 and iteration % report_every == 0
        else:
            continue
        logged = dict(_LOGGED.findall(rest))
        if 'loss' not in logged:
            continue
        loss = _loss(logged['loss'])
        last = iteration
        if first_bad is None and not math.isfinite(loss):
            first_bad = iteration
        if reported:
            losses.append(loss)
            marks.append(iteration)
    stop = _STOP.search(text)
    group = _GROUP.search(stop[1]) if stop else None
    if stop and (first_bad is None or int(stop[2]) < first_bad):
        first_bad = int(stop[2])
    return RunLog(losses, marks, last, first_bad, stop[1].strip() if stop else None,
                  group[1] if group else None)


def _run_name(variant: str, seed: int, clip: bool) -> str:
    return f'{variant}{"" if clip else "_noclip"}_s{seed}'


def _data_root(demo: Demo, dry_run: bool) -> Tuple[str, bool]:
    """The demo's data root (its variable, else the config's default) and
    whether it is there; outside a dry run, missing data is generated there
    first, as the demo scripts do."""
    root = os.environ.get(demo.data_variable) or demo.data_root
    present = osp.isfile(osp.join(root, demo.data_marker))
    if not present and not dry_run:
        subprocess.run([sys.executable, '-m', demo.generator, root], check=True)
        present = True
    return root, present


def train_one(command: Sequence[str], log_path: str, env: Dict[str, str],
              report_every: int = 0) -> Dict:
    """Runs one training, its output into ``log_path``; what ``parse_log``
    reads there, its exit status and seconds."""
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, 'w') as log:
        status = subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT,
                                env=env).returncode
    with open(log_path, errors='replace') as log:
        parsed = parse_log(log.read(), report_every)
    return dict(parsed._asdict(), exit_status=status, seconds=time.time() - start)


def evaluate_one(demo: str, run_dir: str, options: Sequence[str], env: Dict[str, str],
                 processes: int = PROCESSES, keep_checkpoints: bool = False) -> Dict:
    """Tests a trained run's last checkpoint as the demo's script does, its
    output into ``test.log``: the metrics, what lies outside the demo's band
    (``tools/demo/check_band.py``, whose bands are named as ``DEMOS``) and
    the exit status; ``not_tested`` where the run left no checkpoint.

    Args:
        demo: a name in ``DEMOS``.
        run_dir: the run's work dir (its ``last_checkpoint``).
        options: the variant's model options (``--cfg-options``).
        env: the launcher's environment (``launch_env``).
        processes: ``tools/dist_test.sh``'s GPUS.
        keep_checkpoints: keep them after a test that passed (one that
            failed keeps them always, to be tested again).
    """
    pointer = osp.join(run_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return dict(test_exit_status=None, metrics={}, band_problems=[],
                    not_tested='no last_checkpoint')
    with open(pointer) as f:
        checkpoint = f.read().strip()
    command = test_command(DEMOS[demo], checkpoint, osp.join(run_dir, 'test'), options,
                           processes)
    log_path = osp.join(run_dir, 'test.log')
    with open(log_path, 'w') as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                env=env).returncode
    checker = band_checker()
    with open(log_path, errors='replace') as log:
        metrics = checker.read_metrics(log.read())
    if status == 0 and not keep_checkpoints:
        for path in glob.glob(osp.join(run_dir, '*.pth')):
            os.remove(path)
    return dict(test_exit_status=status, metrics=metrics,
                band_problems=checker.problems(demo, metrics))


def _remove(path: str) -> None:
    if osp.exists(path):
        os.remove(path)


def run(demo: str = 'detection', seeds: Sequence[int] = tuple(range(10)),
        variants: Sequence[str] = tuple(VARIANTS), length: Optional[int] = None,
        clip: bool = True, work_dir: str = 'work_dirs/seeds', extra: Sequence[str] = (),
        checkpoint: bool = False, processes: int = PROCESSES, dry_run: bool = False,
        on_run: Optional[Callable[[Dict], None]] = None, evaluate: bool = False) -> Dict:
    """Every (seed, variant) run of ``demo``, one after another.

    Args:
        demo: a name in ``DEMOS``.
        seeds: ``randomness.seed`` of the runs.
        variants: names in ``VARIANTS`` or the demo's ``peers``.
        length: epochs (iterations for an iteration-based demo) of each run;
            None: the demo's default (with ``evaluate``, the config's schedule).
        clip: keep the config's gradient clipping.
        work_dir: a folder per run under it, its output in ``train.log``.
        extra: ``--cfg-options`` for every run, after the variant's.
        checkpoint: keep the config's checkpoints.
        processes: ``tools/dist_train.sh``'s GPUS.
        dry_run: train nothing.
        on_run: called with the result so far after each run.
        evaluate: test each run's last checkpoint as the demo script does and
            check its metrics against the demo's band (``evaluate_one``).

    Every variant's options are checked on the config first (``check_options``),
    so that a bad option stops the call before any run trains. A dry run
    trains nothing: it builds and checks every command. Missing data is
    generated first (``_data_root``).

    Raises:
        ValueError: an option the config refuses, before any run trains.
    """
    spec = DEMOS[demo]
    length = length or (None if evaluate else spec.length)
    # evaluating needs the last checkpoint: kept while it is tested
    saved = checkpoint or evaluate
    schedules = [check_options(spec, run_options(spec, variant, 0, length, clip, extra, saved))
                 .train_cfg['max_epochs' if spec.by_epoch else 'max_iters']
                 for variant in variants]
    root, present = _data_root(spec, dry_run)
    result = dict(demo=demo, config=spec.config, length=schedules[0] if schedules else length,
                  evaluate=evaluate,
                  unit='epoch' if spec.by_epoch else 'iteration',
                  report_every=spec.report_every, processes=processes,
                  clip=clip, extra=list(extra), seeds=list(seeds), variants=list(variants),
                  data_root=root, data_present=present, work_dir=work_dir, dry=dry_run, runs=[])
    for seed in seeds:
        for variant in variants:
            name = _run_name(variant, seed, clip)
            run_dir = osp.join(work_dir, name)
            options = run_options(spec, variant, seed, length, clip, extra, saved)
            command = run_command(spec, run_dir, options, processes)
            entry = dict(variant=variant, seed=seed, command=shlex.join(command),
                         work_dir=run_dir)
            if not dry_run:
                env = launch_env(**{spec.data_variable: root})
                if evaluate:  # a pointer left by an earlier sweep is not this run's
                    _remove(osp.join(run_dir, 'last_checkpoint'))
                entry.update(train_one(command, osp.join(run_dir, 'train.log'), env,
                                       spec.report_every))
                if evaluate and run_verdict(entry) == 'trained':
                    model = list(variant_options(spec, variant)) + list(extra)
                    entry.update(evaluate_one(demo, run_dir, model, env, processes,
                                              checkpoint))
            result['runs'].append(entry)
            if on_run is not None:
                on_run(result)
    return result


def _format_loss(value: float) -> str:
    if math.isnan(value):
        return 'NaN'
    return f'{value:.3g}'.replace('e+', 'e')


def run_cell(entry: Optional[Dict]) -> str:
    """One run in the table: its losses at each epoch's end, then where it
    met a non-finite value (and the module group the hook named), or how it
    failed."""
    if entry is None:
        return '-'
    if 'exit_status' not in entry:
        return 'not trained'
    if 'metrics' in entry:
        return evaluated_cell(entry)
    cell = ', '.join(_format_loss(v) for v in entry['losses']) or 'no epoch ended'
    if entry['first_nonfinite'] is not None:
        group = f' in {entry["stop_group"]}' if entry['stop_group'] else ''
        cell += f'; non-finite at {entry["first_nonfinite"]}{group}'
        if entry['exit_status'] == 0:
            cell += ', NOT stopped'
    elif entry['exit_status'] != 0:
        cell += f'; failed (exit {entry["exit_status"]})'
    return cell


def evaluated_cell(entry: Dict) -> str:
    """A trained and tested run: its last logged loss and its metrics, then
    what lies outside the band or how its test failed."""
    loss = _format_loss(entry['losses'][-1]) if entry['losses'] else 'no loss logged'
    if entry.get('not_tested'):
        return f'{loss}; not tested: {entry["not_tested"]}'
    metrics = ', '.join(f'{k} {v:g}' for k, v in entry['metrics'].items())
    cell = f'{loss}; {metrics or "no metrics"}'
    if entry['test_exit_status']:
        cell += f'; test failed (exit {entry["test_exit_status"]})'
    elif entry['band_problems']:
        cell += '; OUTSIDE: ' + ', '.join(entry['band_problems'])
    return cell


VERDICTS = ('trained', 'in band', 'outside band', 'stopped', 'unstopped', 'failed')


def run_verdict(entry: Dict) -> str:
    """'trained', 'stopped' (a non-finite value, and NonFiniteStopHook's
    error ended the run), 'unstopped' (non-finite, exit 0: the guard failed)
    or 'failed' (any other end: a crash after a NaN is no stop). A trained
    run that was evaluated is 'in band' or 'outside band' ('failed' where
    its test failed)."""
    bad, status = entry['first_nonfinite'] is not None, entry['exit_status']
    if bad and status == 0:
        return 'unstopped'
    if bad and entry.get('stop_message'):
        return 'stopped'
    if status != 0 or bad:
        return 'failed'
    if 'metrics' not in entry:
        return 'trained'
    if entry['test_exit_status'] != 0:
        return 'failed'
    return 'outside band' if entry['band_problems'] else 'in band'


def format_report(result: Dict) -> str:
    """The seed table (a row per seed, a column per variant), then per
    variant how many of its runs met a non-finite value."""
    runs = {(r['seed'], r['variant']): r for r in result['runs']}
    unit = result['unit']
    length = f'{result["length"]} {unit}s'
    head = (f'{result["config"]}, {result["processes"]} processes, '
            + (f'{length}, each run tested and checked against its band, '
               if result.get('evaluate') else f'the first {length}, ')
            + ('clipping as configured' if result['clip'] else 'no gradient clipping')
            + (f', {" ".join(result["extra"])}' if result['extra'] else '')
            + ('; dry run: nothing trained' if result['dry'] else ''))
    when = ('each epoch\'s end' if unit == 'epoch'
            else f'every {result["report_every"]} iterations')
    shown = ('the last logged loss and the metrics' if result.get('evaluate')
             else f'the logged loss at {when}')
    lines = [head, f'{shown}; the first non-finite iteration',
             '', markdown_table(['seed', *result['variants']],
                                [(seed, *(run_cell(runs.get((seed, v)))
                                          for v in result['variants']))
                                 for seed in result['seeds']])]
    trained = [r for r in result['runs'] if 'exit_status' in r]
    for variant in result['variants']:
        verdicts = [run_verdict(r) for r in trained if r['variant'] == variant]
        if verdicts:
            counts = ', '.join(f'{verdicts.count(v)} {v}' for v in VERDICTS if v in verdicts)
            lines.append(f'{variant}: {counts} of {len(verdicts)} runs')
    return '\n'.join(lines)


def scalars_file(run: str) -> str:
    """A run's ``scalars.json``: ``run`` itself, or the newest under
    ``run/<timestamp>/vis_data/`` (a work dir trained more than once)."""
    if osp.isfile(run):
        return run
    found = sorted(glob.glob(osp.join(run, '*', 'vis_data', 'scalars.json')))
    if not found:
        raise FileNotFoundError(f'no */vis_data/scalars.json under {run}: not a trained '
                                'work dir')
    return found[-1]


def run_config(scalars: str) -> Dict:
    """The config a run dumped beside its scalars (``vis_data/config.py``), or {}."""
    path = osp.join(osp.dirname(scalars), 'config.py')
    if not osp.isfile(path):
        return {}
    from mmengine.config import Config
    return Config.fromfile(path, import_custom_modules=False).to_dict()


def per_iteration(means: Sequence[float], window: int) -> List[float]:
    """The values behind MMEngine's logged running means: the logged value of a
    ``grad_norm`` or ``loss`` key at iteration k is the mean of the last
    ``window`` iterations' values (``LogProcessor``), so a spike is diluted
    ``window``-fold. Needs every iteration logged, from the first.

    Raises:
        ValueError: a non-positive window, or means no running mean of
            non-negative values (norms) gives.
    """
    if window < 1:
        raise ValueError(f'window must be >= 1, got {window}')
    values: List[float] = []
    previous_sum = 0.0
    for k, mean in enumerate(means):
        total = mean * min(k + 1, window)
        value = total - previous_sum + (values[k - window] if k >= window else 0.0)
        if value < -1e-6 * max(1.0, abs(total)):
            raise ValueError(f'value {k + 1} would be {value:.3g}: these are not running '
                             f'means over {window} of non-negative values')
        values.append(max(value, 0.0))
        previous_sum = total
    return values


def grad_norms(run: str) -> Dict:
    """A run's gradient norm per module group at every iteration
    (``grad_norm.<group>``, undone from the logger's running mean), with its
    seed and clipping from its config.

    Raises:
        ValueError: a run that logged no group norms or skipped iterations
            (train with ``custom_hooks.0.log_group_norms=True
            default_hooks.logger.interval=1``).
    """
    scalars = scalars_file(run)
    with open(scalars) as f:
        rows = [r for r in map(json.loads, filter(str.strip, f)) if 'iter' in r]
    train = [r for r in rows if any(k.startswith('grad_norm.') for k in r)]
    iterations = [r['iter'] for r in train]
    if not train or iterations != list(range(1, len(train) + 1)):
        raise ValueError(f'{scalars}: needs grad_norm.<group> at every iteration from the '
                         'first (custom_hooks.0.log_group_norms=True '
                         'default_hooks.logger.interval=1)')
    cfg = run_config(scalars)
    window = (cfg.get('log_processor') or {}).get('window_size', 10)  # MMEngine's default
    groups = sorted({k[len('grad_norm.'):] for r in train for k in r
                     if k.startswith('grad_norm.')}, key=_group_order)
    clip = (cfg.get('optim_wrapper') or {}).get('clip_grad')
    return dict(run=run, iterations=iterations, window=window,
                seed=(cfg.get('randomness') or {}).get('seed'),
                clip=clip.get('max_norm') if clip else None, has_config=bool(cfg),
                norms={g: per_iteration([r.get(f'grad_norm.{g}', math.nan) for r in train],
                                        window) for g in groups})


def _group_order(group: str) -> Tuple:
    """The stem, then each stage's local and global branch, then the rest
    (neck, heads) by name."""
    stage = re.fullmatch(r'backbone\.stage(\d+)\.(\w+)', group)
    if group == 'backbone.stem':
        return (0, 0, False, '')
    if stage:
        return (1, int(stage[1]), stage[2] != 'local', stage[2])
    return (2, 0, False, group)


_STAGE_COLOURS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red')
_OTHER_COLOURS = ('tab:purple', 'tab:brown', 'tab:pink', 'tab:olive', 'tab:cyan', 'tab:gray')


def _style(group: str, others: List[str]) -> Dict:
    """A stage's colour for both its branches, dashed for the global one."""
    stage = re.fullmatch(r'backbone\.stage(\d+)\.(\w+)', group)
    if group == 'backbone.stem':
        return dict(color='black')
    if stage:
        return dict(color=_STAGE_COLOURS[(int(stage[1]) - 1) % len(_STAGE_COLOURS)],
                    linestyle='--' if stage[2] == 'global' else '-')
    return dict(color=_OTHER_COLOURS[others.index(group) % len(_OTHER_COLOURS)])


def _title(series: Dict) -> str:
    name = osp.basename(osp.normpath(series['run']))
    if not series['has_config']:
        return name
    clip = ('no clipping' if series['clip'] is None
            else f'clipped at {series["clip"]} (the norms after it)')
    return f'{name}: seed {series["seed"]}, {clip}'


def plot_grad_norms(diverging: str, healthy: str, figure: str) -> Dict:
    """The gradient norm of every module group per iteration of two runs side
    by side on a log scale, the diverging run's last logged iteration marked.

    Args:
        diverging: the diverging run's work dir (or its scalars.json).
        healthy: the healthy run's.
        figure: the image to write (.png).

    Returns:
        Per run: its iterations, largest norm and the group it was in.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = [grad_norms(diverging), grad_norms(healthy)]
    groups = sorted({g for r in runs for g in r['norms']}, key=_group_order)
    others = [g for g in groups if _group_order(g)[0] == 2]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, series in zip(axes, runs):
        for group in groups:
            if group in series['norms']:
                ax.plot(series['iterations'], series['norms'][group], linewidth=1,
                        label=group, **_style(group, others))
        ax.set(yscale='log', xlabel='iteration', title=_title(series))
        ax.title.set_fontsize(9)
    last = runs[0]['iterations'][-1]
    axes[0].axvline(last, color='black', linestyle=':', linewidth=1)
    axes[0].annotate(f'last logged iteration: {last}', (last, 0.04),
                     xycoords=('data', 'axes fraction'), xytext=(-4, 0),
                     textcoords='offset points', ha='right', fontsize=8)
    axes[0].set_ylabel('gradient L2 norm per iteration')
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='center right', fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(figure, dpi=90)
    plt.close(fig)
    summary = {}
    for series in runs:
        peak_group = max(series['norms'], key=lambda g: max(series['norms'][g]))
        summary[series['run']] = dict(iterations=len(series['iterations']),
                                      window=series['window'], peak_group=peak_group,
                                      peak=max(series['norms'][peak_group]))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This case's options (the runner adds ``--dry-run`` and ``--json``)."""
    parser.add_argument('--demo', choices=list(DEMOS), default='detection',
                        help='the demo whose config trains')
    parser.add_argument('--seeds', nargs='+', type=int, default=list(range(10)),
                        help='randomness.seed of the runs (default 0-9)')
    parser.add_argument('--variants', nargs='+', choices=all_variants(), default=list(VARIANTS),
                        help='autograd: the memory\'s autograd backward; closed_form: its '
                        'closed-form backward (the default); local: no global branch; '
                        'convnextv2_pico '
                        '(detection): MMPretrain\'s ConvNeXt-V2-P for the backbone '
                        '(default: the first three)')
    parser.add_argument('--length', type=positive_int,
                        help='epochs of each run (an iteration-based demo: iterations); '
                        'default: detection and classification 3, segmentation 80; with '
                        '--evaluate, the config\'s schedule')
    parser.add_argument('--no-clip', action='store_true',
                        help=f'drop the config\'s gradient clipping ({NO_CLIP})')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='more options for every run, after the variant\'s')
    parser.add_argument('--evaluate', action='store_true',
                        help='train the config\'s whole schedule (unless --length), test '
                        'the last checkpoint as the demo script does and check its metrics '
                        'against the demo\'s band (tools/demo/check_band.py)')
    parser.add_argument('--keep-checkpoints', action='store_true',
                        help='keep the config\'s checkpoints (about 0.5 GB a detection run)')
    parser.add_argument('--processes', type=positive_int, default=PROCESSES,
                        help='processes of each run (tools/dist_train.sh\'s GPUS)')
    parser.add_argument('--work-dir', type=writable_dir, default='work_dirs/seeds',
                        help='one folder per run, its output in train.log')
    parser.add_argument('--plot', nargs=2, metavar=('DIVERGING', 'HEALTHY'),
                        help='train nothing: plot two trained runs\' gradient norms per '
                        'module group (their work dirs)')
    parser.add_argument('--figure', type=writable_file, default='grad_norms.png',
                        help='the --plot figure (.png)')


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``run`` (or ``plot_grad_norms`` with ``--plot``) with the parsed
    options; prints the table. Exit code 1 where a run failed without a
    non-finite value, or met one and was not stopped, or its test failed: a
    run that diverged and stopped, or tested outside its band, is a
    finding, not a failure."""
    if args.plot:
        missing = [p for p in args.plot if not osp.exists(p)]
        if missing:
            raise UsageError(f'--plot: no such run {", ".join(missing)}')
        runs = plot_grad_norms(*args.plot, args.figure)
        for path, summary in runs.items():
            print(f'{path}: {summary["iterations"]} iterations (running mean over '
                  f'{summary["window"]} undone), largest norm {summary["peak"]:.3g} in '
                  f'{summary["peak_group"]}')
        print(f'figure: {args.figure}')
        return dict(figure=args.figure, runs=runs)

    def progress(result: Dict) -> None:
        record.write(result)
        entry = result['runs'][-1]
        if 'exit_status' in entry:
            print(f'{entry["variant"]} seed {entry["seed"]}: {run_cell(entry)} '
                  f'({entry["seconds"]:.0f} s)', file=sys.stderr, flush=True)

    try:
        result = run(args.demo, args.seeds, args.variants, args.length, not args.no_clip,
                     args.work_dir, args.cfg_options, args.keep_checkpoints, args.processes,
                     args.dry_run, on_run=progress, evaluate=args.evaluate)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(format_report(result))
    if args.dry_run:
        print('\n'.join(['', 'the commands:'] + [r['command'] for r in result['runs']]))
    if any(run_verdict(r) in ('failed', 'unstopped') for r in result['runs']
           if 'exit_status' in r):
        result['exit_code'] = 1
    return result
