"""The command line every tiny-dataset generator shares.

    python -m convneur_mm.demo_data.<coco|ade20k|imagenet> OUT_DIR [--<opt> N ...]

The options are the generator function's own keyword arguments, so that the
command line and the Python API cannot drift apart.
"""
import argparse
import inspect
import os.path as osp
import sys
from typing import Callable, List, Optional


def generator_main(generate: Callable[..., dict], argv: Optional[List[str]] = None) -> None:
    """Parse ``argv`` into ``generate(out_dir, **sizes, seed=...)`` and report what it wrote."""
    doc = sys.modules[generate.__module__].__doc__ or ''
    parser = argparse.ArgumentParser(description=doc.strip().split('\n')[0])
    parser.add_argument('out_dir', help='dataset root to write')
    for name, param in inspect.signature(generate).parameters.items():
        if name != 'out_dir':
            # the default's type: ints for the sizes, a str for a choice (e.g. a relation)
            parser.add_argument('--' + name.replace('_', '-'), type=type(param.default),
                                default=param.default,
                                help=f'default: {param.default}')
    args = parser.parse_args(argv)
    try:
        written = generate(**vars(args))
    except (ValueError, FileExistsError) as error:  # bad sizes, a folder not ours
        parser.exit(2, f'{parser.prog}: error: {error}\n')
    for split, what in written.items():
        if isinstance(what, (list, tuple)):  # image files
            what = f'{len(what)} images in {osp.dirname(what[0])}'
        print(f'{split}: {what}')
