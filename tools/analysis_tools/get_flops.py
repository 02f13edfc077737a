"""Parameters and MACs of a config's backbone and whole model.

    python tools/analysis_tools/get_flops.py CONFIG [--shape H W]

Two conventions (see convneur_mm/utils/complexity.py): "paper" counts what
ptflops-style module hooks see (the paper's FLOPs; the memory read and inner
loop are invisible to it), "full" counts every executed matrix product and
convolution too. Default shape: 224x224 for classification, 800x1333 for
detection, 512x2048 for segmentation (the paper's tables).
"""
import argparse

from mmengine.config import DictAction

import convneur_mm  # noqa: F401
from convneur_mm.utils.complexity import measure_config


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file (path, or name of a shipped config)')
    parser.add_argument('--shape', type=int, nargs='+', help='input H W (or one size)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value')
    return parser.parse_args()


def main():
    args = parse_args()
    result = measure_config(args.config, args.shape, args.cfg_options)
    h, w = result['shape']
    print(f'{args.config}  ({result["model"]}, input 1x3x{h}x{w})')
    print('| part | params (M) | paper MACs (G) | full MACs (G) |')
    print('|---|---|---|---|')
    for part in ('backbone', 'whole'):
        r = result[part]
        print(f'| {part} | {r["params"] / 1e6:.3f} | {r["paper"] / 1e9:.3f} | '
              f'{r["full"] / 1e9:.3f} |')


if __name__ == '__main__':
    main()
