"""Analyses of a model, by task; several tasks in one call.

    python tools/analysis_tools/analyze_model.py --tasks TASK [TASK ...] [CONFIG ...]
        [options] [--json PATH]

  flops           params and MACs in three conventions (CONFIGs, or --table5)
  compilations    graphs that --compile builds while evaluating each CONFIG's image sizes
  fp16-headroom   the fp16 loss scale each CONFIG's training step can take
  erf             effective receptive fields of --models
  gates           the Figure 4 gate panels of each CONFIG on --image

Options shared by tasks take each task's default when not given. The
library functions are in convneur_mm/analysis/; docs/user_guides/useful_tools.md
says what each task prints. The lab's fixed measurements (the memory's op
counts, the Table 5 training) run from a checkout: python -m benchmarks.run.
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Callable, Dict, List, Optional

from mmengine.config import DictAction

from convneur_mm.utils.cli import positive_int, writable_dir, writable_file
from convneur_mm.utils.paths import is_remote
from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings

TASKS = ('flops', 'compilations', 'fp16-headroom', 'erf', 'gates')
NEEDS_CONFIG = ('compilations', 'fp16-headroom', 'gates')
# shared options whose default depends on the task
DEFAULTS = dict(size=dict(erf=512), top={'fp16-headroom': 5},
                num_images=dict(compilations=24, erf=16))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from convneur_mm.analysis.receptive_field import BACKBONES
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tasks', nargs='+', required=True, metavar='TASK',
                   help=f'one or more of {", ".join(TASKS)}')
    p.add_argument('configs', nargs='*', help='config files (paths, or names of shipped configs)')
    p.add_argument('--json', type=writable_file, metavar='PATH', help='write every result here')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                   help='config overrides, key=value (flops, fp16-headroom)')
    p.add_argument('--seed', type=int, default=0, help='compilations, fp16-headroom')
    p.add_argument('--device', help='fp16-headroom: cuda where available')
    p.add_argument('--batch', type=positive_int, help="fp16-headroom (the config's)")
    p.add_argument('--size', type=positive_int, help='input side: erf (512)')
    p.add_argument('--top', type=positive_int, help='gradients listed: fp16-headroom (5)')
    p.add_argument('--num-images', type=positive_int, help='compilations (24), erf (16)')
    p.add_argument('--out-dir', type=writable_dir, default='.',
                   help='where erf.png and gates_CONFIG.png go')
    g = p.add_argument_group('flops')
    g.add_argument('--shape', type=positive_int, nargs='+', help="input H W (or one size)")
    g.add_argument('--table5', action='store_true', help='every row config of configs/ablations/')
    g = p.add_argument_group('compilations')
    g.add_argument('--long-side', type=positive_int, default=640)
    g.add_argument('--backend', choices=('eager', 'inductor'), default='eager')
    g.add_argument('--static', action='store_true', help='static shapes in evaluation too')
    g = p.add_argument_group('fp16-headroom')
    g.add_argument('--iters', type=positive_int, default=2)
    g = p.add_argument_group('erf')
    g.add_argument('--models', nargs='+', default=['ConvNeur-M3', 'ConvNeXt-V2-P'],
                   choices=list(BACKBONES))
    g.add_argument('--checkpoints', nargs='*', default=[], help='one per model, or none')
    g.add_argument('--image-dir', help='images (default: smooth random ones)')
    g = p.add_argument_group('gates')
    g.add_argument('--image', help='the image to draw on')
    g.add_argument('--checkpoint', help="the config's model weights (default: random)")
    g.add_argument('--short-side', type=positive_int, default=512,
                   help="the image's short side after resizing")
    args = p.parse_args(argv)
    # ``--tasks flops CONFIG``: argparse gives the config to --tasks
    n = next((i for i, t in enumerate(args.tasks) if t not in TASKS), len(args.tasks))
    tasks, rest = args.tasks[:n], args.tasks[n:]
    if not tasks or not all(t.endswith('.py') for t in rest):
        p.error(f'argument --tasks: give tasks out of {", ".join(TASKS)}, got {args.tasks}')
    args.tasks, args.configs = tasks, rest + args.configs
    if 'flops' in tasks and not args.configs and not args.table5:
        p.error('--tasks flops needs a CONFIG or --table5')
    for task in set(NEEDS_CONFIG) & set(tasks):
        if not args.configs:
            p.error(f'--tasks {task} needs a CONFIG')
    if 'gates' in tasks and not args.image:
        p.error('--tasks gates needs --image')
    if args.shape and len(args.shape) > 2:
        p.error('--shape takes H W or one size')
    if args.checkpoints and len(args.checkpoints) != len(args.models):
        p.error('--checkpoints: give one per --models entry, or none')
    return args


def missing_input(args: argparse.Namespace) -> Optional[str]:
    """The first input file or folder given that is not there: checked before
    the first task, so that a later task's typo does not end the run after
    the earlier tasks' minutes."""
    for option, paths, is_there in (('--image', [args.image], osp.isfile),
                                    ('--checkpoint', [args.checkpoint], osp.isfile),
                                    ('--checkpoints', args.checkpoints, osp.isfile),
                                    ('--image-dir', [args.image_dir], osp.isdir)):
        for path in paths:
            if path and not is_remote(path) and not is_there(path):
                return f'argument {option}: not found: {path}'
    return None


def _option(args: argparse.Namespace, name: str, task: str):
    """A shared option as given, else the task's default."""
    value = getattr(args, name)
    return value if value is not None else DEFAULTS[name].get(task)


def _log(line: str) -> None:
    print(line, flush=True)


def flops(args: argparse.Namespace) -> dict:
    from convneur_mm.analysis.complexity import complexity_report, format_complexity
    report = complexity_report(args.configs, args.shape, args.cfg_options, args.table5)
    print(format_complexity(report))
    return report


def compilations(args: argparse.Namespace) -> dict:
    from convneur_mm.analysis.compilations import count_compilations, format_compilations
    results = {}
    for config in args.configs:
        results[config] = count_compilations(
            config, _option(args, 'num_images', 'compilations'), args.long_side, args.seed,
            args.backend, args.static, _log)
        print(format_compilations(results[config]))
    return results


def fp16_headroom(args: argparse.Namespace) -> dict:
    from convneur_mm.analysis.fp16_headroom import measure_headroom
    results = {}
    for config in args.configs:
        result = results[config] = measure_headroom(
            config, args.iters, args.device, args.batch, _option(args, 'top', 'fp16-headroom'),
            args.seed, args.cfg_options, _log)
        print(f'loss scale bound over {args.iters} iteration(s): {result["bound"]:g}')
    return results


def erf(args: argparse.Namespace) -> dict:
    from convneur_mm.analysis.receptive_field import (area_shares, plot_receptive_fields,
                                                      receptive_fields)
    from convneur_mm.utils.tables import markdown_table
    maps = receptive_fields(args.models, args.checkpoints, args.image_dir,
                            _option(args, 'num_images', 'erf'), _option(args, 'size', 'erf'))
    shares = {name: area_shares(score) for name, score in maps.items()}
    print(markdown_table(('model', 'area for 20%', '50%', '90% of the contribution'),
                         [[name] + [f'{100 * s:.3g}%' for s in found.values()]
                          for name, found in shares.items()]))
    figure = osp.join(args.out_dir, 'erf.png')
    plot_receptive_fields(maps, figure)
    print(f'wrote {figure}')  # as given: a report must not carry this machine's paths
    return dict(figure=figure, area_shares=shares)


def gates(args: argparse.Namespace) -> dict:
    from convneur_mm.analysis.gate_maps import visualize_gates
    results = {}
    for config in args.configs:
        name = osp.splitext(osp.basename(config))[0]
        figure = osp.join(args.out_dir, f'gates_{name}.png')
        stages = visualize_gates(args.image, config, args.checkpoint, figure, args.short_side)
        print(f'wrote {figure} ({stages} stages)')
        results[config] = dict(figure=figure, stages=stages)
    return results


RUNNERS: Dict[str, Callable[[argparse.Namespace], dict]] = {
    'flops': flops, 'compilations': compilations, 'fp16-headroom': fp16_headroom,
    'erf': erf, 'gates': gates}


def main(argv: Optional[List[str]] = None) -> int:
    silence_known_third_party_warnings()  # the stack's known noise, not ours to act on
    args = parse_args(argv)
    missing = missing_input(args)
    if missing:
        print(f'analyze_model.py: error: {missing}', file=sys.stderr)
        return 2
    if {'erf', 'gates'} & set(args.tasks):
        os.makedirs(args.out_dir, exist_ok=True)
    results = {}
    for i, task in enumerate(dict.fromkeys(args.tasks)):  # each task once, in the given order
        if len(args.tasks) > 1:
            print('\n' * bool(i) + f'## {task}', flush=True)
        results[task] = RUNNERS[task](args)
        sys.stdout.flush()
        if args.json:  # after each task: a later one's failure keeps the results so far
            with open(args.json, 'w') as f:
                json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == '__main__':
    sys.exit(main())
