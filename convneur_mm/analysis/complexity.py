"""Multiply-accumulate counts in three conventions.

* ``paper``: per-module hooks, the way ptflops-style counters see a model:
  convolutions, linear layers, normalization layers, activations, pooling and
  upsampling modules. Functional code inside a module is invisible to it, so
  the neural memory's read and its inner loop are not counted, nor are the
  products inside ``scaled_dot_product_attention``.
* ``paper_matmul``: ``paper`` plus the matrix products of explicit
  ``torch.matmul`` / ``mm`` / ``bmm`` / ``addmm`` / ``baddbmm`` calls, which
  ptflops' PyTorch backend patches (its default): it sees mmcv's Non-local
  affinities, not SDPA, not the ``@`` operator. Products inside the neural
  memory are left out by name: every public implementation of the memory
  runs them through ``torch.func`` and ``@``, so ptflops never saw them; ours
  spells the same products as ``bmm``. This convention reproduces the rows
  of the paper's Tables 1, 4 and 5 within 3% (``paper`` alone all but
  Non-local's), except four that count low for reasons of the paper's
  design that the text leaves open (docs/notes/benchmarks.md#flop-counts):
  memory in every block and C_m = 256 (6-8%), IR-RWKV (4.7%), Titans (9.2%).
* ``full``: every matrix product and convolution the forward pass executes
  (counted at the ATen dispatch level by ``torch.utils.flop_counter``, so the
  memory read, the closed-form inner gradients, the scans and the attention
  products are included; torch has no formula for the CPU flash-attention
  kernel, so we register its), plus the element-wise work of normalization,
  activation and pooling modules. Not a superset of ``paper``: bias
  additions, which the module hooks count, are not matrix products (CBAM:
  1.471 G full, 1.478 G paper).
"""
import math
import os.path as osp
import sys
from contextlib import ExitStack
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

CONVENTIONS = ('paper', 'paper_matmul', 'full')


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of SDPA's two products (Q K^T and P V), as torch counts its CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FLOP counter knows SDPA's CUDA kernels, not the CPU flash kernel
SDPA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
# the matrix products ptflops' PyTorch backend replaces by counting wrappers;
# addmm-like ones take (input, mat1, mat2)
PTFLOPS_PRODUCTS = ((torch, 'matmul'), (torch.Tensor, 'matmul'), (torch, 'mm'),
                    (torch.Tensor, 'mm'), (torch, 'bmm'), (torch.Tensor, 'bmm'),
                    (torch, 'addmm'), (torch.Tensor, 'addmm'), (torch, 'baddbmm'))
ADDMM_LIKE = ('addmm', 'baddbmm')

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU,
               nn.Sigmoid, nn.Hardswish)
POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
         nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
ELEMENTWISE = NORMS + ACTIVATIONS + POOLS + (nn.Upsample, )
COUNTED = (nn.modules.conv._ConvNd, nn.Linear) + ELEMENTWISE


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _conv_macs(m: nn.modules.conv._ConvNd, inputs, output) -> int:
    per_position = m.in_channels // m.groups * math.prod(m.kernel_size)
    positions = output.numel() // output.shape[1]
    return positions * m.out_channels * per_position + (output.numel() if m.bias is not None else 0)


def _linear_macs(m: nn.Linear, inputs, output) -> int:
    tokens = inputs.numel() // m.in_features
    return tokens * m.in_features * m.out_features + (output.numel() if m.bias is not None else 0)


def _norm_macs(m: nn.Module, inputs, output) -> int:
    affine = getattr(m, 'affine', False) or getattr(m, 'elementwise_affine', False)
    return inputs.numel() * (2 if affine else 1)


def module_macs(m: nn.Module, inputs, output) -> int:
    """MACs that a ptflops-style hook attributes to module ``m`` (0 if unseen)."""
    inputs, output = _first_tensor(inputs), _first_tensor(output)
    if inputs is None or output is None:
        return 0
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_macs(m, inputs, output)
    if isinstance(m, nn.Linear):
        return _linear_macs(m, inputs, output)
    if isinstance(m, NORMS):
        return _norm_macs(m, inputs, output)
    if isinstance(m, ACTIVATIONS):
        return output.numel()
    if isinstance(m, POOLS):
        return inputs.numel()
    if isinstance(m, nn.Upsample):
        return output.numel()
    return 0


class _PtflopsProducts:
    """MACs of the matrix products ptflops' PyTorch backend sees, counted the
    way it counts them: while active, ``PTFLOPS_PRODUCTS`` are replaced by
    counting wrappers. The ``@`` operator calls the C method directly and
    SDPA runs its own kernels, so neither is seen (as in ptflops). Calls made
    inside the modules in ``hidden``, and calls from torch's own Python code
    (the decompositions that shape-only FakeTensor runs go through; eager
    mode never makes them), are not counted."""

    def __init__(self, hidden: Sequence[nn.Module]):
        self.macs = 0
        self._inside = 0
        self._hidden = hidden
        self._undo = []

    def _wrap(self, name: str, original: Callable) -> Callable:
        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            caller = sys._getframe(1).f_globals.get('__name__', '')
            if not self._inside and caller.split('.')[0] != 'torch':
                mat1 = args[1] if name in ADDMM_LIKE else args[0]
                self.macs += out.numel() * mat1.shape[-1]
            return out
        return counted

    def _enter(self, step: int) -> None:
        self._inside += step

    def __enter__(self) -> '_PtflopsProducts':
        for owner, name in PTFLOPS_PRODUCTS:
            original = getattr(owner, name)
            setattr(owner, name, self._wrap(name, original))
            self._undo.append(lambda owner=owner, name=name, f=original: setattr(owner, name, f))
        for module in self._hidden:
            for handle in (module.register_forward_pre_hook(lambda *_: self._enter(1)),
                           module.register_forward_hook(lambda *_: self._enter(-1))):
                self._undo.append(handle.remove)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()


@torch.no_grad()
def count_macs(model: nn.Module, run: Callable[[], object]) -> Dict[str, int]:
    """Run ``run()`` once and return MACs in each of ``CONVENTIONS``.

    Hooks are registered on every leaf-level module of ``model``; a module
    counted by the paper convention is not descended into (ptflops does the
    same), so no work is counted twice.
    """
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    paper = [0]
    elementwise = [0]

    def hook(m, inputs, output):
        macs = module_macs(m, inputs, output)
        paper[0] += macs
        if isinstance(m, ELEMENTWISE):
            elementwise[0] += macs

    products = _PtflopsProducts([m for m in model.modules() if isinstance(m, NeuralMemory)])
    with ExitStack() as stack:
        for m in _counted_modules(model):
            stack.callback(m.register_forward_hook(hook).remove)
        counter = FlopCounterMode(display=False, custom_mapping=SDPA_FORMULAS)
        with counter, products:
            run()
    return dict(paper=paper[0], paper_matmul=paper[0] + products.macs,
                full=counter.get_total_flops() // 2 + elementwise[0])


def _counted_modules(model: nn.Module):
    """Modules the paper convention hooks: the outermost countable ones."""
    stack = [model]
    while stack:
        m = stack.pop()
        if isinstance(m, COUNTED):
            yield m
            continue
        stack.extend(m.children())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


DEFAULT_SHAPES = {'mmpretrain': (224, 224), 'mmdet': (800, 1333), 'mmseg': (512, 2048)}


def _count_shape_only(model: nn.Module, run: Callable[[], object],
                      inputs: torch.Tensor, rebind: Callable[[torch.Tensor], None]
                      ) -> Dict[str, int]:
    """``count_macs`` with fake (shape-only) tensors: seconds instead of minutes
    at 512x2048. Models whose forward depends on values (e.g. the RPN's box
    selection in a detector) are run for real instead."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        rebind(mode.from_tensor(inputs))
        try:
            return count_macs(model, run)
        except DataDependentOutputException:
            pass
        finally:
            rebind(inputs)
    return count_macs(model, run)


def measure_config(config: str, shape: Optional[Sequence[int]] = None,
                   cfg_options: Optional[dict] = None) -> dict:
    """Params and MACs (every convention) of a config's backbone and model.

    ``shape`` defaults to the paper's: 224x224 (classification), 800x1333
    (detection), 512x2048 (segmentation).
    """
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model, dummy_batch, tensor_forward
    cfg = load_config(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    shape = tuple(shape or DEFAULT_SHAPES[cfg.default_scope])
    if len(shape) == 1:
        shape = (shape[0], shape[0])
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f'shape must be H W (or one size), positive, got {list(shape)}')
    model = build_model(cfg, init=False).eval()
    batch = dummy_batch(model, cfg.default_scope, shape)
    inputs = batch['inputs']

    def rebind(tensor: torch.Tensor) -> None:
        batch['inputs'] = tensor

    backbone = _count_shape_only(model.backbone, lambda: model.backbone(batch['inputs']),
                                 inputs, rebind)
    whole = _count_shape_only(model, lambda: tensor_forward(model, batch), inputs, rebind)
    return dict(shape=shape, model=type(model).__name__,
                backbone=dict(params=count_params(model.backbone), **backbone),
                whole=dict(params=count_params(model), **whole))


def _g(macs: float) -> str:
    return f'{macs / 1e9:.3f}'


def complexity_report(configs: Sequence[str], shape: Optional[Sequence[int]] = None,
                      cfg_options: Optional[dict] = None, table5: bool = False) -> dict:
    """``measure_config`` of every config: Table 5 rows (configs with a
    ``table5`` entry) as whole models in one table, any other config as its
    backbone and whole model at its own shape.

    Args:
        configs: config files (paths, or names of shipped configs).
        shape: input H W (or one size); default: each task's paper shape.
        cfg_options: config overrides.
        table5: add every row config of ``configs/ablations/``.

    Returns:
        ``{'parts': {config: result}, 'rows': {config: dict(result, meta=...)}}``.
    """
    from convneur_mm.analysis.ablations import ablation_configs, row_meta
    from convneur_mm.apis.launch import load_config
    if not configs and not table5:
        raise ValueError('give a config or ask for the Table 5 rows')
    cfgs = {c: load_config(c) for c in configs}
    rows = [c for c in configs if cfgs[c].get('table5')]
    given = {osp.realpath(cfgs[c].filename) for c in rows}
    rows += [c for c in ablation_configs() if table5 and osp.realpath(c) not in given]
    parts = {c: measure_config(c, shape, cfg_options) for c in configs if c not in rows}
    measured = {c: measure_config(c, shape, cfg_options) for c in rows}
    return dict(parts=parts, rows={c: dict(r, meta=row_meta(cfgs.get(c) or load_config(c)))
                                   for c, r in measured.items()})


def format_complexity(report: dict) -> str:
    """Markdown tables of a ``complexity_report``: each other config's parts,
    then the Table 5 rows beside the paper's GFLOPs."""
    from convneur_mm.utils.tables import markdown_table
    blocks = []
    for config, result in report['parts'].items():
        h, w = result['shape']
        rows = [(part, f'{result[part]["params"] / 1e6:.3f}', _g(result[part]['paper']),
                 _g(result[part]['paper_matmul']), _g(result[part]['full']))
                for part in ('backbone', 'whole')]
        blocks.append(f'{config}  ({result["model"]}, input 1x3x{h}x{w})\n' + markdown_table(
            ('part', 'params (M)', 'paper MACs (G)', 'paper + matmul (G)', 'full MACs (G)'),
            rows))
    if report['rows']:
        h, w = next(iter(report['rows'].values()))['shape']
        rows = []
        for config, result in report['rows'].items():
            meta, r = result['meta'], result['whole']
            paper = meta.get('paper_gflops')
            rows.append((f'{meta["variant"]} {meta["method"]}', osp.basename(config),
                         f'{r["params"] / 1e6:.2f}', '-' if paper is None else paper,
                         _g(r['paper']), _g(r['paper_matmul']), _g(r['full'])))
        blocks.append(f'Table 5 rows, whole models, input 1x3x{h}x{w}; GFLOPs are MACs, as '
                      'in the paper\n\n' + markdown_table(
                          ('row', 'config', 'params (M)', 'paper GFLOPs', 'ours: paper',
                           'paper + matmul', 'full'), rows))
    return '\n\n'.join(blocks)
