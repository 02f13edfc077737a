"""Parameters and MACs of configs' backbones and whole models.

    python tools/analysis_tools/get_flops.py CONFIG [CONFIG ...] [--shape H W]
    python tools/analysis_tools/get_flops.py --table5      # every Table 5 row

Three conventions (see convneur_mm/analysis/complexity.py): "paper" counts what
ptflops-style module hooks see (the memory read and inner loop and the
products inside scaled_dot_product_attention are invisible to it); "paper +
matmul" adds the explicit torch.matmul/bmm products that ptflops' PyTorch
backend also patches (mmcv-style Non-local affinities); "full" counts every
executed matrix product and convolution. The paper's FLOPs are MACs.
Default shape: 224x224 for classification, 800x1333 for detection, 512x2048
for segmentation (the paper's tables). ``--table5`` prints the rows of
configs/ablations/ next to the paper's figures.
"""
import argparse
import os.path as osp
import sys

from mmengine.config import DictAction

import convneur_mm  # noqa: F401
from convneur_mm.analysis.complexity import measure_config
from convneur_mm.apis.launch import load_config
from convneur_mm.utils.tables import markdown_table


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*',
                        help='config files (paths, or names of shipped configs)')
    parser.add_argument('--table5', action='store_true',
                        help='every row config of configs/ablations/, with the paper\'s GFLOPs')
    parser.add_argument('--shape', type=int, nargs='+', help='input H W (or one size)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value')
    args = parser.parse_args()
    if not args.configs and not args.table5:
        parser.error('give a CONFIG or --table5')
    return args


def _g(macs: float) -> str:
    return f'{macs / 1e9:.3f}'


def print_parts(config: str, result: dict) -> None:
    """Backbone and whole model of one config."""
    h, w = result['shape']
    print(f'{config}  ({result["model"]}, input 1x3x{h}x{w})')
    rows = [(part, f'{result[part]["params"] / 1e6:.3f}', _g(result[part]['paper']),
             _g(result[part]['paper_matmul']), _g(result[part]['full']))
            for part in ('backbone', 'whole')]
    print(markdown_table(('part', 'params (M)', 'paper MACs (G)', 'paper + matmul (G)',
                          'full MACs (G)'), rows))


def print_rows(configs: list, results: list) -> None:
    """One line per config: the whole model, and the paper's figure if known."""
    from convneur_mm.analysis.ablations import row_meta
    rows = []
    for config, result in zip(configs, results):
        meta = row_meta(load_config(config))
        r = result['whole']
        paper = meta.get('paper_gflops')
        rows.append((f'{meta["variant"]} {meta["method"]}', osp.basename(config),
                     f'{r["params"] / 1e6:.2f}', '-' if paper is None else paper,
                     _g(r['paper']), _g(r['paper_matmul']), _g(r['full'])))
    print(markdown_table(('row', 'config', 'params (M)', 'paper GFLOPs', 'ours: paper',
                          'paper + matmul', 'full'), rows))


def main():
    from convneur_mm.analysis.ablations import ablation_configs
    args = parse_args()
    # Table 5 rows (configs with a `table5` entry, all classifiers) in one
    # table; any other config as its backbone and whole model, at its shape
    cfgs = {c: load_config(c) for c in args.configs}
    rows = [c for c in args.configs if cfgs[c].get('table5')]
    parts = [c for c in args.configs if c not in rows]
    given = {osp.realpath(cfgs[c].filename) for c in rows}
    rows += [c for c in ablation_configs() if args.table5 and osp.realpath(c) not in given]
    for i, config in enumerate(parts):
        print('\n' * bool(i), end='')
        print_parts(config, measure_config(config, args.shape, args.cfg_options))
    if rows:
        results = [measure_config(c, args.shape, args.cfg_options) for c in rows]
        h, w = results[0]['shape']
        print('\n' * bool(parts) + f'Table 5 rows, whole models, input 1x3x{h}x{w}; '
              'GFLOPs are MACs, as in the paper\n')
        print_rows(rows, results)
    sys.stdout.flush()


if __name__ == '__main__':
    main()
