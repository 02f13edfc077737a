"""Table and figure of probe runs: accuracy against cost per Table 5 row.

Reads what ``python -m projects.global_probe.probe.train`` printed (one or more logs;
other lines are skipped), groups the runs by variant, and prints a Markdown
table (mean and range of the validation top-1 over seeds, time per step,
peak memory of a step) and, with ``--out``, plots mean top-1 (bars: min to
max over seeds) against time per step. Runs that name their image size
(the probe prints it) are grouped per variant and size, and each variant's
sizes are joined by a line: accuracy against cost as the resolution grows.

    python -m projects.global_probe.probe.train --variants ours local attention ... | tee probe.log
    python projects/global_probe/tools/plot_probe.py probe.log --out docs/figures/probe_table5.png
"""
import argparse
import os.path as osp
import statistics
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), *[osp.pardir] * 3))  # the repository: projects run from a checkout
from projects.global_probe.probe.train import parse_result_line  # noqa: E402


Group = Tuple[str, Optional[int]]  # (variant, image size or None)


def group_runs(lines: List[str]) -> Dict[Group, List[dict]]:
    """Result rows by variant and image size, in the order they first appear."""
    groups: Dict[Group, List[dict]] = {}
    for line in lines:
        row = parse_result_line(line)
        if row is not None:
            groups.setdefault((row['variant'], row['size']), []).append(row)
    return groups


def summarize(runs: List[dict]) -> dict:
    accs = [100 * r['val_acc'] for r in runs]
    return dict(seeds=len(runs), mean=statistics.mean(accs), low=min(accs), high=max(accs),
                ms_per_step=statistics.mean(r['ms_per_step'] for r in runs),
                step_mb=statistics.mean(r['step_mb'] for r in runs))


def table(groups: Dict[Group, List[dict]]) -> str:
    sized = any(size is not None for _, size in groups)
    lines = ['| variant |' + (' size |' if sized else '') +
             ' seeds | top-1 mean (min-max) | ms / step | step peak MiB |',
             '|---|' + ('---|' if sized else '') + '---|---|---|---|']
    for (variant, size), runs in groups.items():
        s = summarize(runs)
        where = f' {size if size is not None else "-"} |' if sized else ''
        lines.append(f'| {variant} |{where} {s["seeds"]} | {s["mean"]:.1f}% ({s["low"]:.1f}-'
                     f'{s["high"]:.1f}) | {s["ms_per_step"]:.0f} | {s["step_mb"]:.0f} |')
    return '\n'.join(lines)


def plot(groups: Dict[Group, List[dict]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    # Variants are named in a legend beside the axes, not next to their points:
    # rows often tie in accuracy or cost, and labels in the plot then overlap.
    fig, ax = plt.subplots(figsize=(9, 4.8))
    variants: Dict[str, List[Tuple[Optional[int], dict]]] = {}
    for (variant, size), runs in groups.items():
        variants.setdefault(variant, []).append((size, summarize(runs)))
    markers = 'osD^vP*Xhp<>'
    for i, (variant, points) in enumerate(variants.items()):
        points.sort(key=lambda p: p[0] or 0)
        x = [s['ms_per_step'] for _, s in points]
        y = [s['mean'] for _, s in points]
        style = markers[i % len(markers)] + ('-' if len(points) > 1 else '')
        ax.errorbar(x, y, fmt=style, capsize=3, label=variant, ms=6, alpha=0.9,
                    yerr=[[s['mean'] - s['low'] for _, s in points],
                          [s['high'] - s['mean'] for _, s in points]])
        if len(points) > 1:  # the size at each point, beside it
            for size, s in points:
                ax.annotate(f'{size} px', (s['ms_per_step'], s['mean']), fontsize=7,
                            color='grey', xytext=(6, 4), textcoords='offset points')
    ax.axhline(50, color='grey', lw=0.8, ls=':', label='chance')
    ax.axhline(75, color='grey', lw=0.8, ls='--', label='additive bound')
    ax.set_xscale('log')
    ax.set_xlabel('training step (ms, batch 32, one thread)')
    ax.set_ylabel('validation top-1 (%)\nmean, bars min-max over seeds')
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc='center left', bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('logs', nargs='+', help="the probe's printed output")
    parser.add_argument('--out', help='PNG to write')
    parser.add_argument('--title', default='probe: accuracy against cost')
    args = parser.parse_args(argv)
    lines = []
    for log in args.logs:
        with open(log) as f:
            lines += f.read().splitlines()
    groups = group_runs(lines)
    if not groups:
        print('no probe result lines in ' + ', '.join(args.logs), file=sys.stderr)
        return 1
    print(table(groups))
    if args.out:
        plot(groups, args.out, args.title)
        print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
