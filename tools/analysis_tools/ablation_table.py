"""Train and evaluate every row of the paper's Table 5 under one recipe, print
the table, and plot accuracy against GFLOPs.

    python tools/analysis_tools/ablation_table.py [ROW_CONFIG ...]
        [--recipe CONFIG] [--seeds 0 1 2] [--gpus 1] [--row-minutes 6]
        [--flops-shape 224] [--speed-shape 224] [--speed-batch 16]
        [--work-dir work_dirs/ablation_table] [--skip-speed | --speed-only]

Rows: the given configs, by default every config of configs/ablations/ in the
paper's order. Recipe (default: configs/ablations/recipes/imagenet_tiny_m3.py,
4 epochs of the tiny ImageNet at 64x64, light augmentation, one process: the
whole table in about half an hour on 2 CPU cores): its data, schedule, head and
runtime; each row contributes its backbone only (convneur_mm/analysis/ablations.py),
so every row trains with the same recipe and seed. The recipe's dataset is
generated when missing, by the recipe's ``data_generator`` (default: the
tiny ImageNet's generator) called with its ``data_generator_args``.

Per row and seed it runs tools/dist_train.sh (``--gpus`` gloo processes on a
CPU), bounded by ``--row-minutes``, and reads the last validation's top-1 /
top-5; it records the training time per epoch and the peak memory (max RSS)
of a training process (the host's, also on a GPU). Per row it counts
parameters and MACs in the three conventions of
convneur_mm/analysis/complexity.py at ``--flops-shape``, and times inference
throughput and its peak memory at ``--speed-shape`` in a fresh process.
Results are cached per row and seed under ``--work-dir``: a rerun continues
where the last one stopped (a result is reused only for the same merged row
config and settings; failed runs are retried), so that the training can
share the machine and the timings run alone
(``--skip-speed``, then ``--speed-only``). Prints a Markdown table, writes it
with the results (JSON) and the plot to ``--work-dir``; exits non-zero if a
row failed or ran out of time.

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
import socket
import subprocess
import sys
import time
from typing import List, Optional

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))  # where dist_train.sh is

DEFAULT_RECIPE = 'ablations/recipes/imagenet_tiny_m3.py'
DEFAULT_GENERATOR = 'convneur_mm.demo_data.imagenet'
CHILD_MARK = 'ABLATION_CHILD_RESULT '


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('rows', nargs='*', help='row configs (default: configs/ablations/)')
    parser.add_argument('--recipe', default=DEFAULT_RECIPE,
                        help='classification config whose data and schedule every row uses')
    parser.add_argument('--data-root', help='dataset root (default: the recipe\'s)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--gpus', type=int, default=1, help='training processes')
    parser.add_argument('--row-minutes', type=float, default=6.0,
                        help='time limit of one training run')
    parser.add_argument('--flops-shape', type=int, default=224, help='input size for MACs')
    parser.add_argument('--speed-shape', type=int, default=224,
                        help='input size of the throughput measurement')
    parser.add_argument('--speed-batch', type=int, default=16)
    parser.add_argument('--work-dir', default='work_dirs/ablation_table')
    parser.add_argument('--title', default='Table 5 rows',
                        help='heading of the plot')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--skip-speed', action='store_true', help='train only')
    group.add_argument('--speed-only', action='store_true',
                       help='time the rows only (training results come from the cache)')
    parser.add_argument('--force', action='store_true', help='ignore cached results')
    parser.add_argument('--speed-worker', nargs=3, metavar=('CONFIG', 'SHAPE', 'BATCH'),
                        help=argparse.SUPPRESS)
    parser.add_argument('--child', nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


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


def run_child(cmd: List[str]) -> None:
    """Run ``cmd`` and report its exit code, the largest RSS of any of its
    processes and the CPU time of them all (RUSAGE_CHILDREN covers every
    waited-for descendant): CPU seconds, unlike wall time, do not depend on
    what else the machine runs."""
    rc = subprocess.call(cmd)
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

    import convneur_mm  # noqa: F401
    from convneur_mm.analysis.bench_env import (PeakMemoryGrowth, setup_benchmark_device,
                                                time_calls)
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
    import glob
    return glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))


# ---------------------------------------------------------------- rows
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


def train_row(row: Row, seed: int, args, label: str) -> dict:
    """tools/dist_train.sh on the row's config, bounded in time, with progress."""
    work_dir = osp.join(row.dir, f'seed{seed}')
    cmd = [sys.executable, osp.abspath(__file__), '--child', 'bash',
           osp.join(REPO, 'tools', 'dist_train.sh'), row.config, str(args.gpus),
           '--work-dir', work_dir, '--seed', str(seed), '--auto-scale-lr']
    env = dict(os.environ, PORT=str(_free_port()), PYTHON=sys.executable)
    os.makedirs(work_dir, exist_ok=True)
    log_path = osp.join(work_dir, 'train.log')
    start = time.time()
    deadline = start + args.row_minutes * 60
    child = None
    epoch_re = re.compile(r'Epoch\(train\)\s+\[(\d+)\]\[\s*(\d+)/(\d+)\].*?loss: ([\d.]+)')
    val_re = re.compile(r'Epoch\(val\)\s+\[(\d+)\].*?accuracy/top1: ([\d.]+)')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=REPO, start_new_session=True)
        timer = _Killer(proc, deadline)
        for line in proc.stdout:
            log.write(line)
            if line.startswith(CHILD_MARK):
                child = json.loads(line[len(CHILD_MARK):])
                continue
            match = epoch_re.search(line)
            if match and match[2] == match[3]:
                print(f'{label} epoch {match[1]}/{row.epochs}  loss {match[4]}  '
                      f'({time.time() - start:.0f} s)', flush=True)
            match = val_re.search(line)
            if match:
                print(f'{label} val after epoch {match[1]}: top-1 {match[2]}', flush=True)
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


def measure_row(row: Row, args) -> dict:
    """Params and MACs at --flops-shape; throughput in a fresh process."""
    cached = _load(osp.join(row.dir, 'cost.json'))
    if args.force or not _matches(cached, key=row.key, shape=args.flops_shape):
        from convneur_mm.analysis.complexity import measure_config
        whole = measure_config(row.config, (args.flops_shape, args.flops_shape))['whole']
        cached = dict(key=row.key, shape=args.flops_shape, **whole)
        _save(osp.join(row.dir, 'cost.json'), cached)
    return cached


def speed_row(row: Row, args) -> Optional[dict]:
    path = osp.join(row.dir, 'speed.json')
    cached = _load(path)
    setting = dict(key=row.key, shape=args.speed_shape, batch=args.speed_batch)
    if not _matches(cached, **setting):
        cached = None
    if args.skip_speed or (cached is not None and not args.force and not args.speed_only):
        return cached
    out = subprocess.run([sys.executable, osp.abspath(__file__), '--speed-worker', row.config,
                          str(args.speed_shape), str(args.speed_batch)],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f'timing {row.name} failed:\n{out.stderr[-2000:]}')
    result = dict(setting, **json.loads(out.stdout.strip().splitlines()[-1]))
    _save(path, result)
    return result


# ---------------------------------------------------------------- report
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


def table(rows: List[dict], seeds: List[int]) -> str:
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


# ---------------------------------------------------------------- main
def ensure_data(recipe, data_root: str, generator: str) -> None:
    if osp.isfile(osp.join(data_root, 'meta', 'val.txt')):  # written last
        return
    print(f'generating {data_root} with {generator}', flush=True)
    subprocess.run([sys.executable, '-m', generator, data_root,
                    *recipe.get('data_generator_args', [])], check=True, cwd=REPO)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child)
    if args.speed_worker:
        config, shape, batch = args.speed_worker
        print(json.dumps(measure_speed(config, int(shape), int(batch))))
        return 0
    import convneur_mm  # noqa: F401
    from convneur_mm.analysis.ablations import ablation_configs
    from convneur_mm.apis.launch import load_config
    recipe = load_config(args.recipe)
    data_root = osp.abspath(args.data_root or recipe.train_dataloader.dataset.data_root)
    if not args.speed_only:
        ensure_data(recipe, data_root, recipe.get('data_generator', DEFAULT_GENERATOR))
    configs = args.rows or ablation_configs()
    rows = [Row(c, recipe, data_root, args.work_dir) for c in configs]
    print(f'{len(rows)} rows x {len(args.seeds)} seeds, recipe {args.recipe}, '
          f'data {data_root}, {args.gpus} processes, at most {args.row_minutes:g} min per run',
          flush=True)
    results, start = [], time.time()
    for index, row in enumerate(rows, 1):
        entry = dict(name=row.name, config=row.config, meta=row.meta, runs=[],
                     cost=measure_row(row, args))
        for seed in args.seeds:
            cached = _load(row.run_file(seed))
            setting = dict(key=row.key, gpus=args.gpus)
            if not _matches(cached, status='ok', **setting):
                cached = None  # another row config, recipe or data; or a failed run: again
            label = f'[{index}/{len(rows)} {row.name} seed {seed}]'
            if (cached is None or args.force) and not args.speed_only:
                print(f'{label} training', flush=True)
                cached = dict(seed=seed, **setting, **train_row(row, seed, args, label))
                _save(row.run_file(seed), cached)
                print(f'{label} {cached["status"]}: top-1 {cached.get("top1", "-")}, '
                      f'{cached["wall_s"] / 60:.1f} min '
                      f'({(time.time() - start) / 60:.1f} min since the start)', flush=True)
            entry['runs'].append(cached or dict(seed=seed, status='not run'))
        entry['speed'] = speed_row(row, args)
        results.append(entry)
    summarize(results)
    text = table(results, args.seeds)
    speed = next((r['speed'] for r in results if r.get('speed')), None)
    header = (f'Recipe {args.recipe} ({len(args.seeds)} seed(s): {args.seeds}); MACs at '
              f'{args.flops_shape}x{args.flops_shape}; throughput: inference, batch '
              f'{args.speed_batch} at {args.speed_shape}x{args.speed_shape}, fastest of '
              f'{SPEED_RUNS} calls'
              + (f' on {speed["device"]}' if speed else ' (not timed)')
              + '. Accuracies on the recipe\'s tiny set are a smoke test of learning, '
              'not the paper\'s ImageNet numbers.')
    print('\n' + header + '\n\n' + text)
    with open(osp.join(args.work_dir, 'table.md'), 'w') as f:
        f.write(header + '\n\n' + text + '\n')
    _save(osp.join(args.work_dir, 'results.json'), dict(
        recipe=args.recipe, seeds=args.seeds, rows=results))
    plot(results, osp.join(args.work_dir, 'accuracy_vs_gflops.png'), args.title)
    print(f'\nplot: {osp.join(args.work_dir, "accuracy_vs_gflops.png")}')
    incomplete = [r['name'] for r in results if r['failed'] or r['top1'] is None]
    if incomplete and not args.speed_only:
        print(f'incomplete rows: {incomplete}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
