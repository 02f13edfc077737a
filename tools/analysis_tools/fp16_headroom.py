"""How high fp16 loss scaling can go on a config's training step, and which
gradient holds it down.

    python tools/analysis_tools/fp16_headroom.py CONFIG [--iters 2]
        [--device cuda|cpu] [--batch N] [--top 5] [--seed 0] [--cfg-options K=V ...]

Runs ``--iters`` training steps' forward and backward passes (no optimizer
step) on the config's training data, at loss scale 1, and prints for each the
largest float16 gradients: of tensors (module and op) and of parameters of
layers that ran in float16, then the loss scale above which the step would
overflow float16. Dynamic loss scaling (``--amp``) settles near that bound;
the smaller it is, the more small gradients round to zero.

On CUDA the whole model runs under fp16 autocast, as ``--amp`` runs it. On
a CPU, a stand-in: only the backbone runs under fp16 autocast (mmcv's CPU ops
take no float16), with LayerNorm in float32 as CUDA's autocast runs it; the
neck's and heads' own float16 gradients are not seen there.
"""
import argparse
import shutil
import sys
import tempfile
from contextlib import ExitStack
from typing import List, Optional

import torch
from mmengine.config import DictAction

from convneur_mm.analysis.fp16_headroom import Float16Gradients, cuda_fp16_stand_in
from convneur_mm.apis.launch import build_runner, check_data_paths, load_config
from convneur_mm.utils.cli import positive_int


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('--iters', type=positive_int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=positive_int,
                        help="the training batch (default: the config's)")
    parser.add_argument('--top', type=positive_int, default=5,
                        help='gradients listed of each kind')
    parser.add_argument('--seed', type=int, default=0,
                        help='initial weights and data order (the gradients depend on both)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    return parser.parse_args(argv)


def _fp16_backbone(model: torch.nn.Module) -> None:
    """The CPU stand-in: the backbone under fp16 autocast, its outputs float32."""
    forward = model.backbone.forward

    def forward_in_fp16(*args, **kwargs):
        with cuda_fp16_stand_in():
            outs = forward(*args, **kwargs)
        return type(outs)(o.float() for o in outs) if isinstance(outs, (tuple, list)) \
            else outs.float()

    model.backbone.forward = forward_in_fp16


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # the runner's logs go to a directory of its own, removed after the run
    work_dir = tempfile.mkdtemp(prefix='fp16_headroom_')
    try:
        return headroom_report(args, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def headroom_report(args: argparse.Namespace, work_dir: str) -> int:
    """Print the largest float16 gradients of ``args.iters`` steps and the
    loss scale bound; the runner works in ``work_dir``."""
    cuda = torch.device(args.device).type == 'cuda'
    cfg = load_config(args.config, args.cfg_options, work_dir=work_dir)
    check_data_paths(cfg, ['train_dataloader'])  # a clear error, not os.scandir's
    if args.batch is not None:
        cfg.train_dataloader.batch_size = args.batch
    cfg.train_dataloader.update(num_workers=0, persistent_workers=False)
    cfg.default_hooks.checkpoint = None
    cfg.randomness = dict(seed=args.seed)
    runner = build_runner(cfg)
    model = runner.model.to(args.device)
    model.init_weights()
    model.train()
    if cuda:
        print('[fp16_headroom] the whole model under fp16 autocast on', args.device)
    else:
        print('[fp16_headroom] CPU stand-in: the backbone under fp16 autocast (LayerNorm in '
              'float32, as on CUDA), neck and heads in float32')
        _fp16_backbone(model)
    recorder = Float16Gradients(model)
    bounds = []
    batches = iter(runner.train_dataloader)
    for it in range(args.iters):
        data = model.data_preprocessor(next(batches), True)
        model.zero_grad(set_to_none=True)
        with ExitStack() as stack:
            stack.enter_context(recorder.recording())
            if cuda:
                stack.enter_context(torch.autocast('cuda', dtype=torch.float16))
            loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
        headroom = recorder.headroom(args.top)
        bounds.append(headroom.bound)
        print(f'iteration {it}: input {tuple(data["inputs"].shape)}, loss {loss.item():.4g}')
        for kind, found in (('tensors', headroom.tensors), ('parameters', headroom.parameters)):
            print(f'  largest float16 gradients of {kind}:')
            for name, value in found:
                print(f'    {value:10.3g}  {name}')
        name, value = headroom.largest
        print(f'  largest {value:.3g} ({name}): loss scale bound {headroom.bound:g}')
    print(f'loss scale bound over {args.iters} iteration(s): {min(bounds):g}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
