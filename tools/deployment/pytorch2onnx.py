"""Export a ConvNeur classifier, segmentor or backbone to ONNX, and check it.

    python tools/deployment/pytorch2onnx.py CONFIG [CHECKPOINT] --out FILE
        [--shape H W] [--dynamic] [--backbone-only] [--check-shape H W]
        [--atol 1e-4] [--opset N]

The whole model (classification: logits; Semantic FPN / UperNet: the decode
head's logits at 1/4 of the input size) or, with ``--backbone-only``, the
backbone of any config (detection included) is exported with the config's
normalization inside the graph: its input ``images`` is float32 (N, 3, H, W),
pixel values 0..255 in the channel order the pipeline loads (BGR, as
``cv2.imread`` gives). The tool prints what preprocessing stays outside.

The exported file is then run with ONNX Runtime on the same input as PyTorch
(and with ``--dynamic`` also at a second size, by default one where some
memory has another number of chunks); the tool prints the largest absolute
difference, and when it exceeds ``--atol`` (default 1e-4, float32) says so
and exits with status 1 (the file is left for inspection). Without a checkpoint the weights
are random (the config's init), which exports and checks the graph alike.
Whole detectors are not exported (see convneur_mm/deployment/export.py).
"""
import argparse
import os.path as osp
import sys

import torch

from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model
from convneur_mm.deployment import (DeployableModel, ExportCheckError, check_onnx,
                                    check_size_for, export_onnx, memory_chunk_counts)
from convneur_mm.utils.cli import positive_int, writable_file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?', help='weights (default: random init)')
    parser.add_argument('--out', required=True, type=writable_file,
                        help='the .onnx file to write')
    parser.add_argument('--shape', type=positive_int, nargs=2, metavar=('H', 'W'),
                        help='export input size (classification 224 224, segmentation '
                        'the crop size)')
    parser.add_argument('--batch', type=positive_int, default=1)
    parser.add_argument('--dynamic', action='store_true', help='symbolic height and width')
    parser.add_argument('--backbone-only', action='store_true')
    parser.add_argument('--check-shape', type=positive_int, nargs=2, metavar=('H', 'W'),
                        help='second check size with --dynamic (default: chosen so that '
                        'some memory gets another number of chunks)')
    parser.add_argument('--atol', type=float, default=1e-4)
    parser.add_argument('--opset', type=int, help='ONNX opset (default: the exporter\'s)')
    args = parser.parse_args(argv)
    if args.check_shape and not args.dynamic:
        parser.error('--check-shape is the second check size of a --dynamic export')
    if not args.out.endswith('.onnx'):
        parser.error(f'--out must end with .onnx, got {args.out}')
    return args


def written_opset(path: str) -> int:
    import onnx
    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))


def default_shape(cfg) -> tuple:
    if cfg.get('default_scope') == 'mmseg':
        size = cfg.model.data_preprocessor.get('size') or cfg.get('crop_size')
        if size:
            return tuple(size)
        return (512, 512)
    return (224, 224)


def build(cfg, checkpoint):
    model = build_model(cfg, init=checkpoint is None)
    if checkpoint:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    return model.eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.checkpoint and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    cfg = load_config(args.config)
    scope = cfg.get('default_scope')
    model = build(cfg, args.checkpoint)
    module = DeployableModel(model, 'backbone' if args.backbone_only else 'model', scope).eval()
    if args.dynamic:
        sequential = [m for m in model.backbone.modules()
                      if getattr(m, 'update', None) == 'sequential']
        if sequential:
            raise ValueError('--dynamic needs memory_cfg.update=\'parallel\': the sequential '
                             'update loops over chunks in Python, so its graph is fixed to '
                             'the traced number of chunks')
    shape = tuple(args.shape or default_shape(cfg))
    torch.manual_seed(0)
    example = torch.rand(args.batch, 3, *shape) * 255
    print(f'exporting {type(model).__name__} ({"backbone" if args.backbone_only else "whole model"}) '
          f'of {osp.basename(args.config)} at {shape}, dynamic={args.dynamic}')
    export_onnx(module, example, args.out, dynamic_dims=(2, 3) if args.dynamic else (),
                output_names=module.output_names(), opset=args.opset)
    if args.opset and written_opset(args.out) != args.opset:  # torch's exporter may raise it
        print(f'{args.out} has opset {written_opset(args.out)}, not the --opset {args.opset} '
              'asked for: torch\'s exporter does not write that opset', file=sys.stderr)
        return 1
    inputs = [example]
    if args.dynamic:
        other = tuple(args.check_shape or check_size_for(model.backbone, shape))
        inputs.append(torch.rand(args.batch, 3, *other) * 255)
    ok = True
    for images in inputs:
        try:
            result = check_onnx(args.out, module, [images], args.atol)[0]
        except ExportCheckError as error:
            ok = False
            print(f'CHECK FAILED: {error}', file=sys.stderr)
            continue
        chunks = memory_chunk_counts(model.backbone, result['shape'][2:])
        print(f'ONNX Runtime vs PyTorch at {result["shape"]}: max abs diff '
              f'{result["max_abs_diff"]:.3g} (outputs up to {result["max_abs_output"]:.3g}; '
              f'memory chunks per stage {chunks})')
    print(module.preprocessing())
    if not ok:
        print(f'{args.out} was written but does not match PyTorch within {args.atol:g}: '
              'do not deploy it', file=sys.stderr)
        return 1
    print(f'wrote {osp.abspath(args.out)}; check passed (atol {args.atol:g})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
