"""The warm-start experiment on the embedded tiny ImageNet, end to end.

1. train MMPretrain's ConvNeXt-V2-P config with MMPretrain's own tools/train.py
   (configs/demo/cls_convnextv2_pico_imagenet_tiny.py);
2. convert its checkpoint (tools/model_converters/convnextv2_to_convneur.py --task cls);
3. evaluate the source (MMPretrain's tools/test.py) and ConvNeur-M3 under the
   warm start with no training;
4. train ConvNeur-M3 for the same number of iterations: from the converted
   checkpoint with the warm start and with the paper's init, and from scratch;
5. plot the validation top-1 of every run (docs/figures/warm_start_tiny.png)
   and write the numbers to WORK_DIR/summary.json.

    python tools/demo/warm_start.py [--work-dir work_dirs/warm_start] [--figure PATH]

Finished steps are skipped when the script runs again (delete WORK_DIR to redo).
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SOURCE_CFG = osp.join(REPO, 'configs', 'demo', 'cls_convnextv2_pico_imagenet_tiny.py')
M3_CFG = osp.join(REPO, 'configs', 'demo', 'cls_convneur_m3_convnextv2_imagenet_tiny.py')
CONVERTER = osp.join(REPO, 'tools', 'model_converters', 'convnextv2_to_convneur.py')
FINE_TUNE_LR = 2.5e-4  # a quarter of the from-scratch lr: fine-tuning, not training
BATCH = 32  # the configs' (one process)


def _mmpretrain_tool(name: str) -> str:
    import mmpretrain
    return osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools', name)


def _start(cmd: List[str], log: str, env: Optional[dict] = None) -> subprocess.Popen:
    shown = [a if '\n' not in a else '<code>' for a in cmd]
    print('$', ' '.join(shown), f'> {log}', flush=True)
    os.makedirs(osp.dirname(log), exist_ok=True)
    # one intra-op thread: on shared cores OpenMP's spinning threads oversubscribe
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    with open(log, 'w') as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def _wait(process: subprocess.Popen, log: str) -> None:
    if process.wait():
        raise SystemExit(f'failed ({process.returncode}); see {log}')


def _run(cmd: List[str], log: str, env: Optional[dict] = None) -> None:
    _wait(_start(cmd, log, env), log)


def _last_checkpoint(work_dir: str) -> Optional[str]:
    marker = osp.join(work_dir, 'last_checkpoint')
    return open(marker).read().strip() if osp.isfile(marker) else None


def val_curve(work_dir: str, iters_per_epoch: int) -> List[Tuple[int, float]]:
    """(iteration, top-1) of every validation of a run (MMEngine's scalars.json,
    whose validation steps are epochs)."""
    points = []
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if 'accuracy/top1' in row:
                    points.append((int(row['step']) * iters_per_epoch,
                                   float(row['accuracy/top1'])))
    return points


class Training:
    """A training run in the background (skipped if it has finished before)."""

    def __init__(self, name: str, work_dir: str, tool: List[str], config: str,
                 env: Optional[dict] = None, options: Tuple[str, ...] = ()):
        self.run_dir = osp.join(work_dir, name)
        self.log = osp.join(work_dir, 'logs', f'{name}.log')
        self.process = None
        if _last_checkpoint(self.run_dir) is None:
            cmd = [sys.executable, *tool, config, '--work-dir', self.run_dir]
            if options:
                cmd += ['--cfg-options', *options]
            self.process = _start(cmd, self.log, env)

    def checkpoint(self) -> str:
        if self.process is not None:
            _wait(self.process, self.log)
        return _last_checkpoint(self.run_dir)


def evaluate_converted(checkpoint: str, work_dir: str, data_root: str,
                       global_init: str) -> float:
    """ConvNeur-M3's top-1 with the converted weights and no training: the
    runner initializes the model (init_cfg, then ``global_init``) and tests it."""
    code = (
        'import json, sys\n'
        'from convneur_mm.apis.launch import build_runner, load_config\n'
        'cfg = load_config(sys.argv[1], {"model.backbone.global_init": sys.argv[3]},\n'
        '                  work_dir=sys.argv[2])\n'
        'runner = build_runner(cfg, training=False)\n'
        'runner.model.init_weights()\n'
        'metrics = runner.test()\n'
        'print("TOP1", json.dumps(metrics["accuracy/top1"]))\n')
    name = f'{global_init}_step0'
    log = osp.join(work_dir, 'logs', f'{name}.log')
    _run([sys.executable, '-c', code, M3_CFG, osp.join(work_dir, name), global_init], log,
         dict(CONVNEUR_PRETRAINED=checkpoint, IMAGENET_TINY_ROOT=data_root))
    return float(next(line.split()[1] for line in open(log) if line.startswith('TOP1')))


def evaluate_source(checkpoint: str, work_dir: str, data_root: str) -> float:
    """The source's top-1 by MMPretrain's tools/test.py."""
    log = osp.join(work_dir, 'logs', 'source_test.log')
    _run([sys.executable, _mmpretrain_tool('test.py'), SOURCE_CFG, checkpoint, '--work-dir',
          osp.join(work_dir, 'source_test')], log, dict(IMAGENET_TINY_ROOT=data_root))
    for path in glob.glob(osp.join(work_dir, 'source_test', '*', '*.json')):
        with open(path) as f:
            metrics = json.load(f)
        if 'accuracy/top1' in metrics:
            return float(metrics['accuracy/top1'])
    raise SystemExit(f'no top-1 found; see {log}')


STEP0_CODE = r"""
import json, sys
import torch
from mmengine.runner import Runner
from mmengine.runner.checkpoint import load_checkpoint
import convneur_mm  # noqa: F401
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model
source_cfg, m3_cfg, source_ckpt = sys.argv[1:4]
source = build_model(load_config(source_cfg), init=False).eval()
load_checkpoint(source, source_ckpt, map_location='cpu')
cfg = load_config(m3_cfg)
loader = Runner.build_dataloader(cfg.val_dataloader)
batches = [source.data_preprocessor(b, False)['inputs'] for b in loader]
images = torch.cat(batches)


def outputs(model):
    stages, hooks = [], [s[-1].register_forward_hook(lambda m, i, o: stages.append(o))
                         for s in model.backbone.stages]
    with torch.no_grad():
        logits = model(images, mode='tensor')
    for h in hooks:
        h.remove()
    return stages, logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


ref_stages, ref_logits = outputs(source)
results = {}
# the lever, then what the global branches get instead of it (on the warm-started model)
variants = [('warm start (G = 0, pwconv2 x2)', 'warm', None),
            ("paper's init", 'paper', None),
            ('zero proj_out only (gate 0.5)', 'paper', 0.0),
            ('zero proj_out weight, bias 4.6 (gate 0.99)', 'paper', 4.6),
            ('zero proj_out weight, bias 6.9 (gate 0.999)', 'paper', 6.9)]
for name, init, bias in variants:
    cfg.model.backbone.global_init = init
    model = build_model(cfg).eval()
    if bias is not None:
        with torch.no_grad():
            for stage in model.backbone.stages:
                stage[0].global_branch.proj_out.weight.zero_()
                stage[0].global_branch.proj_out.bias.fill_(bias)
    stages, logits = outputs(model)
    s = torch.sigmoid(torch.tensor(0.0 if bias is None else bias)).item()
    results[name] = dict(
        stages=[rel(o, r) for o, r in zip(stages, ref_stages)], logits=rel(logits, ref_logits),
        top1_agreement=(logits.argmax(1) == ref_logits.argmax(1)).float().mean().item(),
        gate_slope=s * (1 - s))
print('STEP0', json.dumps(results))
"""


def step0_errors(source: str, converted: str, work_dir: str, data_root: str) -> dict:
    """Relative L2 errors of the four stage outputs and the logits of ConvNeur-M3
    against the source on the validation images, at step 0, for the warm start
    and the alternatives it was chosen over."""
    log = osp.join(work_dir, 'logs', 'step0_errors.log')
    _run([sys.executable, '-c', STEP0_CODE, SOURCE_CFG, M3_CFG, source], log,
         dict(CONVNEUR_PRETRAINED=converted, IMAGENET_TINY_ROOT=data_root))
    return json.loads(next(line[len('STEP0 '):] for line in open(log)
                           if line.startswith('STEP0 ')))


def plot(curves: Dict[str, List[Tuple[int, float]]], figure: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    styles = {'ConvNeXt-V2-P from scratch (MMPretrain, the source)': ('tab:gray', '--'),
              'ConvNeur-M3 from scratch': ('tab:blue', '-'),
              'ConvNeur-M3 from the source, paper init': ('tab:orange', '-'),
              'ConvNeur-M3 from the source, warm start': ('tab:green', '-')}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, points in curves.items():
        if points:
            color, line = styles[label]
            ax.plot(*zip(*points), line, marker='o', markersize=3, color=color, label=label)
    ax.set_xlabel(f'training iterations of the run (batch {BATCH})')
    ax.set_ylabel('val top-1 (%)')
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(figure)), exist_ok=True)
    fig.savefig(figure)


def main(argv: Optional[List[str]] = None) -> None:
    silence_known_third_party_warnings()  # the stack's known noise, not ours to act on
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/warm_start')
    parser.add_argument('--figure', default='docs/figures/warm_start_tiny.png')
    parser.add_argument('--data-root', default='data/imagenet_tiny')
    parser.add_argument('--epochs', type=int, default=20,
                        help="every run's epochs (default: 20, the configs')")
    args = parser.parse_args(argv)
    options = [f'train_cfg.max_epochs={args.epochs}',
               f'default_hooks.checkpoint.interval={args.epochs}']
    work_dir, data_root = osp.abspath(args.work_dir), osp.abspath(args.data_root)
    env = dict(IMAGENET_TINY_ROOT=data_root)
    if not osp.isfile(osp.join(data_root, 'meta', 'val.txt')):
        _run([sys.executable, '-m', 'convneur_mm.demo_data.imagenet', data_root],
             osp.join(work_dir, 'logs', 'data.log'))

    ours = [osp.join(REPO, 'tools', 'train.py')]
    schedule = tuple(options)
    # the from-scratch M3 does not need the source: it trains beside it
    scratch = Training('scratch', work_dir, ours, M3_CFG, env,
                       schedule + ('model.backbone.global_init=paper', ))
    source = Training('source', work_dir, [_mmpretrain_tool('train.py')], SOURCE_CFG, env,
                      schedule).checkpoint()
    converted = osp.join(work_dir, 'convneur_m3_from_pico.pth')
    if not osp.isfile(converted):
        _run([sys.executable, CONVERTER, source, converted, '--task', 'cls', '--arch', 'm3'],
             osp.join(work_dir, 'logs', 'convert.log'))

    fine_tune = dict(env, CONVNEUR_PRETRAINED=converted)
    lr = f'optim_wrapper.optimizer.lr={FINE_TUNE_LR}'
    warm = Training('warm', work_dir, ours, M3_CFG, fine_tune, schedule + (lr, ))
    paper = Training('paper', work_dir, ours, M3_CFG, fine_tune,
                     schedule + (lr, 'model.backbone.global_init=paper'))
    errors = step0_errors(source, converted, work_dir, data_root)
    print(json.dumps(errors, indent=1))
    source_top1 = evaluate_source(source, work_dir, data_root)
    warm_top1 = evaluate_converted(converted, work_dir, data_root, 'warm')
    paper_top1 = evaluate_converted(converted, work_dir, data_root, 'paper')
    print(f'source top-1 {source_top1:.2f}; ConvNeur-M3 from it, no training: warm start '
          f'{warm_top1:.2f}, paper init {paper_top1:.2f}', flush=True)
    for run in (scratch, warm, paper):
        run.checkpoint()

    with open(osp.join(data_root, 'meta', 'train.txt')) as f:
        iters_per_epoch = -(-sum(1 for _ in f) // BATCH)
    curves = {
        'ConvNeXt-V2-P from scratch (MMPretrain, the source)': val_curve(
            osp.join(work_dir, 'source'), iters_per_epoch),
        'ConvNeur-M3 from scratch': val_curve(osp.join(work_dir, 'scratch'), iters_per_epoch),
        'ConvNeur-M3 from the source, paper init': [(0, paper_top1)] + val_curve(
            osp.join(work_dir, 'paper'), iters_per_epoch),
        'ConvNeur-M3 from the source, warm start': [(0, warm_top1)] + val_curve(
            osp.join(work_dir, 'warm'), iters_per_epoch),
    }
    plot(curves, args.figure, 'tiny ImageNet (10 classes, 480 train / 100 val images, 64x64)')
    summary = dict(source_top1=source_top1, warm_start_top1_no_training=warm_top1,
                   paper_init_top1_no_training=paper_top1, step0_errors=errors,
                   fine_tune_lr=FINE_TUNE_LR, curves=curves)
    with open(osp.join(work_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == '__main__':
    main()
