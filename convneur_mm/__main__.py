"""``python -m convneur_mm``: print where the installed configs are.

Use it to inherit our configs from another project::

    export CONVNEUR_CONFIGS=$(python -m convneur_mm configs)
    # my_config.py:  _base_ = ['{{$CONVNEUR_CONFIGS:}}/fpn_convneur_m2_80k_ade20k.py']
"""
import argparse

from convneur_mm.utils.paths import config_dir, tools_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog='python -m convneur_mm', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=['configs', 'tools'], nargs='?', default='configs')
    args = parser.parse_args(argv)
    print(config_dir() if args.what == 'configs' else tools_dir())


if __name__ == '__main__':
    main()
