"""Train and evaluate every row of the paper's Table 5 under one recipe,
tabulate them, and plot accuracy against GFLOPs.

Rows: the given configs, by default every config of configs/ablations/ in the
paper's order. Recipe (default: configs/ablations/recipes/imagenet_tiny_m3.py,
4 epochs of the tiny ImageNet at 64x64, light augmentation, one process: the
whole table in about half an hour on 2 CPU cores): its data, schedule, head and
runtime; each row contributes its backbone only (``ablations.apply_recipe``),
so every row trains with the same recipe and seed. The recipe's dataset is
generated when missing, by the recipe's ``data_generator`` (default: the
tiny ImageNet's generator) called with its ``data_generator_args``.

Per row and seed it runs tools/dist_train.sh (``gpus`` gloo processes on a
CPU), bounded by ``row_minutes``, and reads the last validation's top-1 /
top-5; it records the training time per epoch and the peak memory (max RSS)
of a training process (the host's, also on a GPU). Per row it counts
parameters and MACs in the three conventions of ``complexity`` at
``flops_shape``, and times inference throughput and its peak memory at
``speed_shape`` in a fresh process. Results are cached per row and seed under
``work_dir``: a rerun continues where the last one stopped (a result is
reused only for the same merged row config and settings; failed runs are
retried), so that the training can share the machine and the timings run
alone (``skip_speed``, then ``speed_only``).

Accuracies on the tiny sets are a smoke test of learning, not ImageNet's.
"""
import argparse
import hashlib
import json
import math
import os
import os.path as osp
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks.common.launch import launch_env
from benchmarks.common.record import Record
from convneur_mm.utils.cli import positive_float, positive_int
from convneur_mm.utils.paths import tools_dir

DEFAULT_RECIPE = 'ablations/recipes/imagenet_tiny_m3.py'
DEFAULT_GENERATOR = 'convneur_mm.demo_data.imagenet'
CHILD_MARK = 'ABLATION_CHILD_RESULT '
# children run by ``python -c``: a training wrapped to report its resources,
# and one row's timing in a fresh process
CHILD_CODE = ('import sys; from benchmarks.paper.table5 import run_child; '
              'run_child(sys.argv[1:])')
SPEED_CODE = ('import json, sys; from benchmarks.paper.table5 import measure_speed; '
              'print(json.dumps(measure_speed(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))')


@dataclass
class AblationSettings:
    """What ``run_ablation_table`` trains and measures.

    Args:
        rows: row configs (default: every config of configs/ablations/).
        recipe: the classification config whose data and schedule every row uses.
        data_root: the dataset root (default: the recipe's).
        seeds: one training per row and seed.
        gpus: training processes.
        row_minutes: time limit of one training run.
        flops_shape: input size of the MAC counts.
        speed_shape: input size of the throughput measurement.
        speed_batch: its batch.
        work_dir: where the cache, the table and the plot go.
        title: heading of the plot.
        skip_speed: train only.
        speed_only: time the rows only (training results come from the cache).
        force: ignore cached results.
    """
    rows: Sequence[str] = ()
    recipe: str = DEFAULT_RECIPE
    data_root: Optional[str] = None
    seeds: Sequence[int] = (0, )
    gpus: int = 1
    row_minutes: float = 6.0
    flops_shape: int = 224
    speed_shape: int = 224
    speed_batch: int = 16
    work_dir: str = 'work_dirs/ablation_table'
    title: str = 'Table 5 rows'
    skip_speed: bool = False
    speed_only: bool = False
    force: bool = False


def _repo() -> str:
    """The checkout the lab runs from: its ``python -c`` children import
    ``benchmarks`` from there (the lab is not installed)."""
    return osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _load(path: str) -> Optional[dict]:
    if osp.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def _matches(cached: Optional[dict], **setting) -> bool:
    """Whether a cached result was made with ``setting`` (a result is reused
    only for the same row config, recipe, data and measurement settings)."""
    return cached is not None and all(cached.get(k) == v for k, v in setting.items())


def _save(path: str, data: dict) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(path + '.tmp', path)


def run_child(cmd: Sequence[str]) -> None:
    """Run ``cmd`` and report its exit code, the largest RSS of any of its
    processes and the CPU time of them all (RUSAGE_CHILDREN covers every
    waited-for descendant): CPU seconds, unlike wall time, do not depend on
    what else the machine runs."""
    rc = subprocess.call(list(cmd))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(CHILD_MARK + json.dumps(dict(rc=rc, maxrss_mb=usage.ru_maxrss / 1024,
                                       cpu_s=usage.ru_utime + usage.ru_stime)), flush=True)
    sys.exit(rc)


SPEED_RUNS = 10


def measure_speed(config: str, shape: int, batch: int) -> dict:
    """Inference throughput and the peak memory it adds, in this (fresh)
    process: the fastest of ``SPEED_RUNS`` calls after a warm-up, the call
    least disturbed by a shared machine (medians moved by up to 40% between
    two runs of the table)."""
    import torch

    from convneur_mm.analysis.timing import PeakMemoryGrowth, setup_benchmark_device, time_calls
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    description = setup_benchmark_device(device)
    model = build_model(load_config(config), init=False).to(device).eval()
    x = torch.randn(batch, 3, shape, shape, device=device)
    memory = PeakMemoryGrowth(device)
    with torch.inference_mode():
        times = time_calls(lambda: model(x, mode='tensor'), SPEED_RUNS, device, warmup=1)
    return dict(throughput=batch / min(times), runs=len(times), peak_mb=memory.mib(),
                device=description, shape=shape, batch=batch)


def last_validation(work_dir: str) -> dict:
    """Top-1/top-5 of the last validation and the mean training time per
    epoch, from MMEngine's scalars.json under ``work_dir``."""
    files = sorted(glob_scalars(work_dir))
    if not files:
        raise RuntimeError(f'no scalars.json under {work_dir}')
    with open(files[-1]) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    val = [e for e in entries if 'accuracy/top1' in e]
    train = [e for e in entries if 'loss' in e and 'time' in e]
    if not val:
        raise RuntimeError(f'no validation result in {files[-1]}')
    result = dict(top1=val[-1]['accuracy/top1'], top5=val[-1].get('accuracy/top5'))
    if train:
        iters_per_epoch = train[-1]['iter'] / max(train[-1]['epoch'], 1)
        result['seconds_per_epoch'] = (sum(e['time'] for e in train) / len(train)
                                       * iters_per_epoch)
        result['final_loss'] = train[-1]['loss']
    return result


def glob_scalars(work_dir: str) -> List[str]:
    """The scalars.json of every run under ``work_dir``."""
    import glob
    return glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))


class Row:
    """One Table 5 row under the recipe: its merged config and results."""

    def __init__(self, config: str, recipe, data_root: str, work_dir: str):
        from convneur_mm.analysis.ablations import apply_recipe
        from convneur_mm.apis.launch import load_config
        self.name = osp.splitext(osp.basename(config))[0]
        self.dir = osp.join(work_dir, self.name)
        cfg = apply_recipe(load_config(config), recipe)
        for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            cfg[split].dataset.data_root = data_root
        self.meta = dict(cfg.table5)
        self.epochs = cfg.train_cfg.max_epochs
        os.makedirs(self.dir, exist_ok=True)
        self.config = osp.join(self.dir, 'config.py')
        cfg.dump(self.config)
        with open(self.config, 'rb') as f:  # row, recipe and data: what a cache must match
            self.key = hashlib.sha256(f.read()).hexdigest()[:16]

    def run_file(self, seed: int) -> str:
        return osp.join(self.dir, f'seed{seed}', 'result.json')


def train_row(row: Row, seed: int, settings: AblationSettings, label: str,
              log: Callable[[str], None] = print) -> dict:
    """tools/dist_train.sh on the row's config, bounded in time, with progress."""
    work_dir = osp.join(row.dir, f'seed{seed}')
    cmd = [sys.executable, '-c', CHILD_CODE, 'bash',
           osp.join(tools_dir(), 'dist_train.sh'), row.config, str(settings.gpus),
           '--work-dir', work_dir, '--seed', str(seed), '--auto-scale-lr']
    env = launch_env()
    os.makedirs(work_dir, exist_ok=True)
    log_path = osp.join(work_dir, 'train.log')
    start = time.time()
    deadline = start + settings.row_minutes * 60
    child = None
    epoch_re = re.compile(r'Epoch\(train\)\s+\[(\d+)\]\[\s*(\d+)/(\d+)\].*?loss: ([\d.]+)')
    val_re = re.compile(r'Epoch\(val\)\s+\[(\d+)\].*?accuracy/top1: ([\d.]+)')
    with open(log_path, 'w') as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=_repo(), start_new_session=True)
        timer = _Killer(proc, deadline)
        for line in proc.stdout:
            log_file.write(line)
            if line.startswith(CHILD_MARK):
                child = json.loads(line[len(CHILD_MARK):])
                continue
            match = epoch_re.search(line)
            if match and match[2] == match[3]:
                log(f'{label} epoch {match[1]}/{row.epochs}  loss {match[4]}  '
                    f'({time.time() - start:.0f} s)')
            match = val_re.search(line)
            if match:
                log(f'{label} val after epoch {match[1]}: top-1 {match[2]}')
        proc.wait()
        timer.cancel()
    wall = time.time() - start
    if timer.fired:
        return dict(status='timeout', wall_s=wall, log=log_path)
    if proc.returncode != 0 or child is None or child['rc'] != 0:
        return dict(status='failed', wall_s=wall, log=log_path)
    result = dict(status='ok', wall_s=wall, cpu_s=child.get('cpu_s'),
                  train_peak_mb=child['maxrss_mb'],
                  **last_validation(work_dir))
    return result


class _Killer:
    """Kill a process group at a deadline (the training's time bound)."""

    def __init__(self, proc: subprocess.Popen, deadline: float):
        import threading
        self.fired = False
        self._timer = threading.Timer(max(deadline - time.time(), 0), self._kill, (proc, ))
        self._timer.daemon = True
        self._timer.start()

    def _kill(self, proc: subprocess.Popen) -> None:
        self.fired = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(5)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def measure_row(row: Row, settings: AblationSettings) -> dict:
    """Params and MACs at --flops-shape; throughput in a fresh process."""
    cached = _load(osp.join(row.dir, 'cost.json'))
    if settings.force or not _matches(cached, key=row.key, shape=settings.flops_shape):
        from convneur_mm.analysis.complexity import measure_config
        whole = measure_config(row.config, (settings.flops_shape, settings.flops_shape))['whole']
        cached = dict(key=row.key, shape=settings.flops_shape, **whole)
        _save(osp.join(row.dir, 'cost.json'), cached)
    return cached


def speed_row(row: Row, settings: AblationSettings) -> Optional[dict]:
    """The row's cached timing, or (unless ``skip_speed``) a new one."""
    path = osp.join(row.dir, 'speed.json')
    cached = _load(path)
    setting = dict(key=row.key, shape=settings.speed_shape, batch=settings.speed_batch)
    if not _matches(cached, **setting):
        cached = None
    if settings.skip_speed or (cached is not None and not settings.force
                               and not settings.speed_only):
        return cached
    out = subprocess.run([sys.executable, '-c', SPEED_CODE, row.config,
                          str(settings.speed_shape), str(settings.speed_batch)],
                         capture_output=True, text=True, cwd=_repo())
    if out.returncode != 0:
        raise RuntimeError(f'timing {row.name} failed:\n{out.stderr[-2000:]}')
    result = dict(setting, **json.loads(out.stdout.strip().splitlines()[-1]))
    _save(path, result)
    return result


def _mean_std(values: List[float]) -> Optional[tuple]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(
        values) > 1 else 0.0
    return mean, std


def _fmt(stat: Optional[tuple], digits: int = 1) -> str:
    if stat is None:
        return '-'
    mean, std = stat
    return f'{mean:.{digits}f}' if std == 0 else f'{mean:.{digits}f} ± {std:.{digits}f}'


def summarize(rows: List[dict]) -> List[dict]:
    """Mean and spread over the seeds of each row's finished runs, in place."""
    for r in rows:
        ok = [run for run in r['runs'] if run['status'] == 'ok']
        r['top1'] = _mean_std([run['top1'] for run in ok])
        r['top5'] = _mean_std([run.get('top5') for run in ok])
        r['seconds_per_epoch'] = _mean_std([run.get('seconds_per_epoch') for run in ok])
        r['train_peak_mb'] = _mean_std([run.get('train_peak_mb') for run in ok])
        r['wall_min'] = _mean_std([run['wall_s'] / 60 for run in ok if run.get('wall_s')])
        r['cpu_min'] = _mean_std([run['cpu_s'] / 60 for run in ok if run.get('cpu_s')])
        r['failed'] = [f'seed {run["seed"]}: {run["status"]}' for run in r['runs']
                       if run['status'] != 'ok']
    return rows


def table(rows: List[dict]) -> str:
    """The rows as a Markdown table (``summarize`` first)."""
    from convneur_mm.utils.tables import markdown_table
    body = []
    for r in rows:
        m, cost, speed = r['meta'], r['cost'], r.get('speed')
        paper = (f'{m.get("paper_gflops")}, {m.get("paper_top1")}'
                 if m.get('paper_gflops') is not None else '-')
        top1 = _fmt(r['top1'])
        if r['failed']:
            top1 += ' (' + '; '.join(r['failed']) + ')'
        body.append((m['variant'], m['method'], f'{cost["params"] / 1e6:.2f}',
                     f'{cost["paper"] / 1e9:.2f}', f'{cost["paper_matmul"] / 1e9:.2f}',
                     f'{cost["full"] / 1e9:.2f}',
                     '-' if not speed else format(speed['throughput'], '.1f'),
                     '-' if not speed else format(speed['peak_mb'], '.0f'),
                     _fmt(r['seconds_per_epoch'], 0), _fmt(r['train_peak_mb'], 0), top1,
                     _fmt(r['top5']), paper, f'{_fmt(r["wall_min"])} / {_fmt(r["cpu_min"])}'))
    return markdown_table(
        ('#', 'variant', 'params (M)', 'GFLOPs paper', 'GFLOPs paper + matmul', 'GFLOPs full',
         'img/s', 'peak MB (inference)', 's / epoch', 'peak MB (training, host RSS)', 'top-1',
         'top-5', 'paper: GFLOPs, top-1', 'training min (wall / CPU)'), body)


def plot(rows: List[dict], path: str, title: str) -> None:
    """Top-1 against GFLOPs in two conventions, one marker per row."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    # Rows are named in one legend, not beside their points: rows often tie in
    # accuracy and cost, and labels in the plot then overlap.
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    markers = 'osD^vP*Xhp<>'
    for ax, key, label in ((axes[0], 'paper_matmul',
                            'GFLOPs, paper + matmul (the convention of Table 5)'),
                           (axes[1], 'full', 'GFLOPs, full (every executed product)')):
        for i, r in enumerate(r for r in rows if r['top1'] is not None):
            mean, std = r['top1']
            ax.errorbar(r['cost'][key] / 1e9, mean, yerr=std or None, capsize=3,
                        fmt=markers[i % len(markers)], ms=6, alpha=0.85,
                        color=f'C{i % 10}', label=r['meta']['method'].split(' (')[0])
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel('top-1 (%)')
    axes[1].legend(fontsize=8, loc='center left', bbox_to_anchor=(1.01, 0.5),
                   frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ensure_data(recipe, data_root: str, generator: str,
                log: Callable[[str], None] = print) -> None:
    """Generate the recipe's dataset at ``data_root`` unless it is there."""
    if osp.isfile(osp.join(data_root, 'meta', 'val.txt')):  # written last
        return
    log(f'generating {data_root} with {generator}')
    subprocess.run([sys.executable, '-m', generator, data_root,
                    *recipe.get('data_generator_args', [])], check=True, cwd=_repo())




def run_ablation_table(settings: AblationSettings,
                       log: Callable[[str], None] = print) -> Tuple[dict, int]:
    """Train, measure and tabulate the rows; write ``table.md``,
    ``results.json`` and ``accuracy_vs_gflops.png`` to ``settings.work_dir``.

    Args:
        settings: the rows, recipe and measurements.
        log: called with each line of progress and, last, the report.

    Returns:
        The results (``recipe``, ``seeds``, ``rows``, ``table``) and an exit
        code: 1 where a row failed or ran out of time (unless ``speed_only``).
    """
    from convneur_mm.analysis.ablations import ablation_configs
    from convneur_mm.apis.launch import load_config
    if settings.skip_speed and settings.speed_only:
        raise ValueError('skip_speed and speed_only exclude each other')
    work_dir = osp.abspath(settings.work_dir)
    recipe = load_config(settings.recipe)
    data_root = osp.abspath(settings.data_root or recipe.train_dataloader.dataset.data_root)
    if not settings.speed_only:
        ensure_data(recipe, data_root, recipe.get('data_generator', DEFAULT_GENERATOR), log)
    configs = list(settings.rows) or ablation_configs()
    rows = [Row(c, recipe, data_root, work_dir) for c in configs]
    log(f'{len(rows)} rows x {len(settings.seeds)} seeds, recipe {settings.recipe}, '
        f'data {data_root}, {settings.gpus} processes, at most {settings.row_minutes:g} min '
        'per run')
    results, start = [], time.time()
    for index, row in enumerate(rows, 1):
        entry = dict(name=row.name, config=row.config, meta=row.meta, runs=[],
                     cost=measure_row(row, settings))
        for seed in settings.seeds:
            cached = _load(row.run_file(seed))
            setting = dict(key=row.key, gpus=settings.gpus)
            if not _matches(cached, status='ok', **setting):
                cached = None  # another row config, recipe or data; or a failed run: again
            label = f'[{index}/{len(rows)} {row.name} seed {seed}]'
            if (cached is None or settings.force) and not settings.speed_only:
                log(f'{label} training')
                cached = dict(seed=seed, **setting, **train_row(row, seed, settings, label, log))
                _save(row.run_file(seed), cached)
                log(f'{label} {cached["status"]}: top-1 {cached.get("top1", "-")}, '
                    f'{cached["wall_s"] / 60:.1f} min '
                    f'({(time.time() - start) / 60:.1f} min since the start)')
            entry['runs'].append(cached or dict(seed=seed, status='not run'))
        entry['speed'] = speed_row(row, settings)
        results.append(entry)
    summarize(results)
    text = table(results)
    speed = next((r['speed'] for r in results if r.get('speed')), None)
    header = (f'Recipe {settings.recipe} ({len(settings.seeds)} seed(s): '
              f'{list(settings.seeds)}); MACs at {settings.flops_shape}x{settings.flops_shape}; '
              f'throughput: inference, batch {settings.speed_batch} at '
              f'{settings.speed_shape}x{settings.speed_shape}, fastest of {SPEED_RUNS} calls'
              + (f' on {speed["device"]}' if speed else ' (not timed)')
              + '. Accuracies on the recipe\'s tiny set are a smoke test of learning, '
              'not the paper\'s ImageNet numbers.')
    log('\n' + header + '\n\n' + text)
    with open(osp.join(work_dir, 'table.md'), 'w') as f:
        f.write(header + '\n\n' + text + '\n')
    report = dict(recipe=settings.recipe, seeds=list(settings.seeds), rows=results)
    _save(osp.join(work_dir, 'results.json'), report)
    plot(results, osp.join(work_dir, 'accuracy_vs_gflops.png'), settings.title)
    log(f'\nplot: {osp.join(settings.work_dir, "accuracy_vs_gflops.png")}')
    incomplete = [r['name'] for r in results if r['failed'] or r['top1'] is None]
    if incomplete and not settings.speed_only:
        print(f'incomplete rows: {incomplete}', file=sys.stderr)
        return dict(report, table=text), 1
    return dict(report, table=text), 0


# ----------------------------------------------------------------- the case
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``table5`` case's options."""
    parser.add_argument('rows', nargs='*', metavar='CONFIG',
                        help='row configs (default: every config of configs/ablations/)')
    parser.add_argument('--recipe', default=DEFAULT_RECIPE)
    parser.add_argument('--data-root', help="dataset root (default: the recipe's)")
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--gpus', type=positive_int, default=1, help='training processes')
    parser.add_argument('--row-minutes', type=positive_float, default=6.0)
    parser.add_argument('--flops-shape', type=positive_int, default=224)
    parser.add_argument('--speed-shape', type=positive_int, default=224)
    parser.add_argument('--speed-batch', type=positive_int, default=16)
    parser.add_argument('--work-dir', default='work_dirs/ablation_table')
    parser.add_argument('--title', default='Table 5 rows', help='heading of the plot')
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument('--skip-speed', action='store_true', help='train only')
    speed.add_argument('--speed-only', action='store_true', help='time the cached rows only')
    parser.add_argument('--force', action='store_true', help='ignore cached results')


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``run_ablation_table`` with the parsed options; exit code 1 where a
    row failed. A dry run trains and times nothing: each row's parameters
    and MACs at ``--flops-shape``, the first row alone unless rows are given."""
    from convneur_mm.analysis.ablations import ablation_configs
    from convneur_mm.apis.launch import load_config
    settings = AblationSettings(
        rows=args.rows, recipe=args.recipe, data_root=args.data_root, seeds=args.seeds,
        gpus=args.gpus, row_minutes=args.row_minutes, flops_shape=args.flops_shape,
        speed_shape=args.speed_shape, speed_batch=args.speed_batch, work_dir=args.work_dir,
        title=args.title, skip_speed=args.skip_speed, speed_only=args.speed_only,
        force=args.force)
    if args.dry_run:
        recipe = load_config(settings.recipe)
        rows = [Row(config, recipe, settings.data_root or '', osp.abspath(settings.work_dir))
                for config in (args.rows or ablation_configs()[:1])]
        costs = {row.name: measure_row(row, settings) for row in rows}
        for name, cost in costs.items():
            print(f'{name}: {cost["params"] / 1e6:.2f} M parameters, {cost["paper"] / 1e9:.2f} '
                  f'GMACs at {settings.flops_shape}x{settings.flops_shape}')
        return dict(rows=costs)
    report, code = run_ablation_table(settings, lambda line: print(line, flush=True))
    return dict(report, exit_code=code)
