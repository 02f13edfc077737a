"""Train a ConvNeur model (detection, segmentation or classification).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
    tools/dist_train.sh CONFIG GPUS [ARGS]      # torchrun; gloo on CPU-only machines
"""
import argparse
import os.path as osp
from typing import List, Optional

from mmengine.logging import print_log

import convneur_mm  # noqa: F401  (checkpoint allow-list, registry)
from convneur_mm.engine.compile import (add_compile_argument, bucket_detection_sizes,
                                        compile_runner_model)
from convneur_mm.apis.exit import exit_successfully
from convneur_mm.apis.launch import (add_launch_arguments, build_runner, check_data_paths,
                                     empty_datasets_explained, enable_amp, load_config,
                                     prepare_deterministic, set_local_rank, set_randomness)
from convneur_mm.engine.wrapping import inner_model
from convneur_mm.models.utils.pretrained import check_checkpoint_fits
from convneur_mm.utils.cpu_malloc import tune_cpu_malloc
from convneur_mm.utils.cuda_env import run_on_checked_device
from convneur_mm.utils.paths import is_remote
from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings
from convneur_mm.apis.toolbox import check_toolbox


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a ConvNeur model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision (fp16 with loss scaling on GPU, bf16 on CPU)')
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'],
                        help='autocast dtype for --amp (GPU default float16)')
    add_compile_argument(parser)
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate to the actual total batch size')
    parser.add_argument('--resume', nargs='?', const='auto',
                        help='resume from CKPT, or from the latest checkpoint '
                        'in the work dir when no path is given')
    parser.add_argument('--seed', type=int, help='random seed')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic algorithms (reproducible, slower)')
    add_launch_arguments(parser)
    args = parser.parse_args(argv)
    if args.amp_dtype and not args.amp:
        parser.error('--amp-dtype takes effect with --amp only: add --amp')
    return args


def main():
    silence_known_third_party_warnings()  # the stack's known noise, not ours to act on
    args = parse_args()
    if args.deterministic:
        prepare_deterministic()  # before CUDA starts
    set_local_rank(args.local_rank)  # first: check_cuda probes mmcv on this rank's GPU
    # NVIDIA GPUs that torch cannot use: stop (CONVNEUR_ALLOW_CPU=1: on with them hidden)
    run_on_checked_device()
    print_log(tune_cpu_malloc(), logger='current')
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    check_toolbox(cfg)  # a toolbox that cannot import: a clear error, not a deep one
    check_data_paths(cfg, ['train_dataloader', 'val_dataloader'])
    if args.amp:
        enable_amp(cfg, args.amp_dtype)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr.base_batch_size '
                               'in the config')
        cfg.auto_scale_lr.enable = True
    set_randomness(cfg, args.seed, args.deterministic)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not is_remote(args.resume) and not osp.isfile(args.resume):
            raise FileNotFoundError(f'checkpoint to resume from not found: {args.resume}')
        cfg.resume, cfg.load_from = True, args.resume
    if args.compile:
        bucket_detection_sizes(cfg)
    runner = build_runner(cfg)
    if cfg.get('load_from') and not cfg.get('resume'):  # a resume: ConvNeurRunner.resume
        # MMEngine loads load_from without strict and only logs what does not fit: a
        # backbone left at its initialization is an error here
        check_checkpoint_fits(inner_model(runner.model), cfg.load_from, backbone_only=True)
    if args.compile:
        compile_runner_model(runner, args.compile)
    with empty_datasets_explained():
        runner.train()
    # the work is done and written: exit 0, never a late abort at interpreter
    # tear-down (a PyTorch race: convneur_mm/apis/exit.py)
    exit_successfully()


if __name__ == '__main__':
    main()
