"""``python -m convneur_mm [configs | tools | env]``.

``configs`` / ``tools`` print where the installed configs and tools are; use
them to inherit our configs from another project::

    export CONVNEUR_CONFIGS=$(python -m convneur_mm configs)
    # my_config.py:  _base_ = ['{{$CONVNEUR_CONFIGS:}}/fpn_convneur_m2_80k_ade20k.py']

``env`` prints torch, CUDA, the NVIDIA driver, the GPUs, the flavor of mmcv's
ops, the toolboxes' versions and the CUDA check: paste it into every bug report
(``convneur_mm.utils.collect_env``).
"""
import argparse

from convneur_mm.utils.paths import config_dir, tools_dir
from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings


def main(argv=None) -> None:
    silence_known_third_party_warnings()  # the stack's known noise, not ours to act on
    parser = argparse.ArgumentParser(prog='python -m convneur_mm', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=['configs', 'tools', 'env'], nargs='?',
                        default='configs')
    args = parser.parse_args(argv)
    if args.what == 'env':
        from convneur_mm.utils.collect_env import env_report
        print(env_report())
    else:
        print(config_dir() if args.what == 'configs' else tools_dir())


if __name__ == '__main__':
    main()
