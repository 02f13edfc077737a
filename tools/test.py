"""Evaluate a checkpoint: COCO box/mask AP, ADE20K mIoU or ImageNet top-1/top-5.

    python tools/test.py CONFIG CHECKPOINT [--out results.pkl] [--show-dir DIR]
    tools/dist_test.sh CONFIG CHECKPOINT GPUS [ARGS]
"""
import argparse
import os.path as osp
from typing import List, Optional

from mmengine.logging import print_log

import convneur_mm  # noqa: F401  (checkpoint allow-list, registry)
from convneur_mm.engine.compile import add_compile_argument, compile_runner_model
from convneur_mm.apis.exit import exit_successfully
from convneur_mm.apis.launch import (add_launch_arguments, build_runner, check_data_paths,
                                     empty_datasets_explained, load_config, set_local_rank)
from convneur_mm.engine.dump import prediction_dumper
from convneur_mm.apis.reporting import format_metrics, enable_visualization
from convneur_mm.engine.wrapping import enable_tta, inner_model
from convneur_mm.models.utils.pretrained import check_checkpoint_fits
from convneur_mm.utils.cli import check_writable
from convneur_mm.utils.cpu_malloc import tune_cpu_malloc
from convneur_mm.utils.cuda_env import run_on_checked_device
from convneur_mm.utils.paths import is_remote
from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings
from convneur_mm.apis.toolbox import check_toolbox


def prediction_file(text: str) -> str:
    """argparse type of --out: checked before the evaluation, which would
    otherwise run to its end and then fail to write."""
    if not text.endswith(('.pkl', '.pickle')):
        raise argparse.ArgumentTypeError(f'must end with .pkl or .pickle, got {text}')
    if is_remote(text):  # the backend's to check
        return text
    parent = osp.dirname(osp.abspath(text))
    try:
        if osp.isdir(parent):  # a directory in the way, a read-only file
            check_writable(text)
        else:  # MMEngine makes the missing directories
            check_writable(parent, directory=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Evaluate a ConvNeur checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file (or URL); must fit the model exactly')
    parser.add_argument('--work-dir', help='where evaluation logs go')
    parser.add_argument('--out', type=prediction_file,
                        help='dump predictions to this .pkl file (masks as RLE, '
                        'segmentation as label maps; missing directories are made)')
    parser.add_argument('--show', action='store_true', help='display predictions')
    parser.add_argument('--show-dir', help='save drawn predictions to this directory')
    parser.add_argument('--wait-time', type=float, default=2, help='--show interval (s)')
    parser.add_argument('--show-interval', type=int, default=1, metavar='N',
                        help='--show / --show-dir: every N-th image (segmentation, '
                        'classification; detection draws every image)')
    parser.add_argument('--amp', action='store_true', help='mixed-precision inference')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_model and tta_pipeline")
    add_compile_argument(parser)
    add_launch_arguments(parser)
    return parser.parse_args(argv)


def main():
    silence_known_third_party_warnings()  # the stack's known noise, not ours to act on
    args = parse_args()
    set_local_rank(args.local_rank)  # first: check_cuda probes mmcv on this rank's GPU
    # NVIDIA GPUs that torch cannot use: stop (CONVNEUR_ALLOW_CPU=1: on with them hidden)
    run_on_checked_device()
    print_log(tune_cpu_malloc(), logger='current')
    if not is_remote(args.checkpoint) and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    work_dir = args.work_dir or osp.join(
        './work_dirs', osp.splitext(osp.basename(args.config))[0], 'test')
    cfg = load_config(args.config, args.cfg_options, args.launcher, work_dir)
    check_toolbox(cfg)  # a toolbox that cannot import: a clear error, not a deep one
    check_data_paths(cfg, ['test_dataloader'])
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.amp:
        cfg.test_cfg = dict(cfg.get('test_cfg') or {}, fp16=True)
    if args.show or args.show_dir:
        enable_visualization(cfg, args.show_dir, args.show, args.wait_time, args.show_interval)
    if args.tta:
        enable_tta(cfg)
        print_log(f'--tta: {cfg.model.type} on the config\'s tta_pipeline', logger='current')
    runner = build_runner(cfg, training=False)
    check_checkpoint_fits(inner_model(runner.model), args.checkpoint)
    if args.compile:
        compile_runner_model(runner, args.compile, training=False)
    if args.out:
        runner.test_evaluator.metrics.append(prediction_dumper(cfg.default_scope, args.out))
    with empty_datasets_explained():
        metrics = runner.test()
    if runner.rank == 0:
        print(format_metrics(metrics, title=f'{osp.basename(args.config)} @ '
                                            f'{osp.basename(args.checkpoint)}'))
    # the work is done and written: exit 0, never a late abort at interpreter
    # tear-down (a PyTorch race: convneur_mm/apis/exit.py)
    exit_successfully()


if __name__ == '__main__':
    main()
