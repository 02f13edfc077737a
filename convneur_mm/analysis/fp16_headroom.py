"""How high fp16 loss scaling can go: the largest float16 gradients of a step.

Under fp16 mixed precision the loss is multiplied by a scale before the
backward pass, and every gradient computed in float16 is multiplied with it.
Dynamic loss scaling (MMEngine's ``AmpOptimWrapper``) halves the scale at each
step that overflows 65504 anywhere, so it settles near 65504 divided by the
largest float16 gradient: where that gradient is large, the scale stays small
and the small gradients of the rest of the network round to zero.

``Float16Gradients`` records, for one forward pass and the backward pass after
it, the largest |gradient| of every float16 tensor the forward made (named by
the module and the op that made it) and of every parameter of a convolution or
linear layer that ran in float16 (its gradient was computed in float16).
``measure_headroom`` records a config's training steps with it (``analyze_model.py
--tasks fp16-headroom``).
"""
import math
import shutil
import tempfile
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from convneur_mm.models.utils.precision import autocast_off

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FLOAT16_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def loss_scale_bound(largest_gradient: float) -> float:
    """The largest power of two by which ``largest_gradient`` stays finite in
    float16 (0 where it is not finite even unscaled)."""
    if not math.isfinite(largest_gradient) or largest_gradient > FP16_MAX:
        return 0.0
    if largest_gradient == 0:
        return math.inf
    return 2.0 ** math.floor(math.log2(FP16_MAX / largest_gradient))


def _magnitude(t: Tensor) -> float:
    """max |t|; ``inf`` where any element is not finite (NaN included, which
    would otherwise sort anywhere)."""
    value = t.detach().abs().max().item()
    return value if math.isfinite(value) else math.inf


class Headroom(NamedTuple):
    """The largest float16 gradients of a step, largest first."""
    tensors: List[Tuple[str, float]]     # (module:op, max |gradient|)
    parameters: List[Tuple[str, float]]  # (parameter name, max |gradient|)

    @property
    def largest(self) -> Tuple[str, float]:
        """The name and value of the largest float16 gradient of all."""
        found = self.tensors[:1] + self.parameters[:1]
        return max(found, key=lambda kv: kv[1]) if found else ('', 0.0)

    @property
    def bound(self) -> float:
        """The loss scale above which this step overflows float16."""
        return loss_scale_bound(self.largest[1])


class _Float16Outputs(TorchFunctionMode):
    """Hooks the gradient of every float16 tensor an op makes."""

    def __init__(self, recorder: 'Float16Gradients'):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out, ):
            if (isinstance(tensor, Tensor) and tensor.dtype == torch.float16
                    and tensor.requires_grad):
                self.recorder._hook(tensor, getattr(func, '__name__', str(func)))
        return out


class Float16Gradients:
    """Largest float16 gradients of ``model`` over a forward and backward pass.

    ``with recorder.recording(): loss = ...`` then ``loss.backward()`` and
    ``recorder.headroom()``. Only what runs inside ``recording()`` is seen."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {m: name for name, m in model.named_modules()}
        self.tensor_grads: Dict[str, float] = defaultdict(float)
        self.float16_params: Dict[str, nn.Parameter] = {}
        self._modules: List[str] = []

    def _hook(self, tensor: Tensor, op: str) -> None:
        where = f'{self._modules[-1] if self._modules else "<top>"}:{op}'

        def record(grad: Tensor) -> None:
            self.tensor_grads[where] = max(self.tensor_grads[where], _magnitude(grad))

        tensor.register_hook(record)

    def _enter(self, module: nn.Module, args) -> None:
        self._modules.append(self.names[module] or '<top>')

    def _leave(self, module: nn.Module, args, output) -> None:
        self._modules.pop()
        if isinstance(module, FLOAT16_LAYERS) and isinstance(output, Tensor) \
                and output.dtype == torch.float16:
            prefix = self.names[module]
            self.float16_params.update(
                (f'{prefix}.{name}', p) for name, p in module.named_parameters())

    @contextmanager
    def recording(self) -> Iterator['Float16Gradients']:
        self.tensor_grads.clear()
        self.float16_params.clear()
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._enter))
            handles.append(module.register_forward_hook(self._leave))
        try:
            with _Float16Outputs(self):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._modules.clear()

    def headroom(self, top: int = 5) -> Headroom:
        """The ``top`` largest tensor and parameter gradients (after backward)."""
        params = {name: _magnitude(p.grad)
                  for name, p in self.float16_params.items() if p.grad is not None}

        def largest(found: Dict[str, float]) -> List[Tuple[str, float]]:
            return sorted(found.items(), key=lambda kv: -kv[1])[:top]

        return Headroom(largest(self.tensor_grads), largest(params))


@contextmanager
def cuda_layer_norm_rule() -> Iterator[None]:
    """LayerNorm in float32 under the CPU's float16 autocast, as CUDA's
    autocast runs it (the CPU's runs it in its input's dtype): a CPU stand-in
    for a CUDA fp16 step."""
    layer_norm = F.layer_norm

    def float32_layer_norm(x: Tensor, *args, **kwargs) -> Tensor:
        if x.dtype == torch.float16 and torch.is_autocast_enabled('cpu'):
            with autocast_off('cpu'):
                args = [a.float() if isinstance(a, Tensor) else a for a in args]
                return layer_norm(x.float(), *args, **kwargs)
        return layer_norm(x, *args, **kwargs)

    F.layer_norm = float32_layer_norm
    try:
        yield
    finally:
        F.layer_norm = layer_norm


@contextmanager
def cuda_fp16_stand_in() -> Iterator[None]:
    """The CPU's float16 autocast with CUDA's LayerNorm rule: what a CUDA
    fp16 (``--amp``) step computes, on a CPU."""
    with torch.autocast('cpu', dtype=torch.float16), cuda_layer_norm_rule():
        yield


def _fp16_backbone(model: nn.Module) -> None:
    """The CPU stand-in: the backbone under fp16 autocast, its outputs float32."""
    forward = model.backbone.forward

    def forward_in_fp16(*args, **kwargs):
        with cuda_fp16_stand_in():
            outs = forward(*args, **kwargs)
        return type(outs)(o.float() for o in outs) if isinstance(outs, (tuple, list)) \
            else outs.float()

    model.backbone.forward = forward_in_fp16


def measure_headroom(config: str, iters: int = 2, device: Optional[str] = None,
                     batch: Optional[int] = None, top: int = 5, seed: int = 0,
                     cfg_options: Optional[dict] = None,
                     log: Callable[[str], None] = print) -> dict:
    """The largest float16 gradients of ``iters`` training steps of a config
    (forward and backward at loss scale 1, no optimizer step) and the loss
    scale bound they allow.

    On CUDA the whole model runs under fp16 autocast, as ``--amp`` runs it.
    On a CPU, a stand-in: only the backbone runs under fp16 autocast (mmcv's
    CPU ops take no float16), with LayerNorm in float32 as CUDA's autocast
    runs it; the neck's and heads' own float16 gradients are not seen there.

    Args:
        config: a training config whose training data are there.
        iters: training steps measured.
        device: where to run (default: CUDA where available, else the CPU).
        batch: the training batch (default: the config's).
        top: gradients listed of each kind.
        seed: initial weights and data order (the gradients depend on both).
        cfg_options: config overrides.
        log: called with each line of the report as it is measured.

    Returns:
        ``bound`` (the least over the steps) and ``steps``: per step its
        input shape, loss, largest gradients and bound.
    """
    from convneur_mm.apis.launch import build_runner, check_data_paths, load_config
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cuda = torch.device(device).type == 'cuda'
    # the runner's logs go to a directory of its own, removed after the run
    work_dir = tempfile.mkdtemp(prefix='fp16_headroom_')
    try:
        cfg = load_config(config, cfg_options or {}, work_dir=work_dir)
        check_data_paths(cfg, ['train_dataloader'])  # a clear error, not os.scandir's
        if batch is not None:
            cfg.train_dataloader.batch_size = batch
        cfg.train_dataloader.update(num_workers=0, persistent_workers=False)
        cfg.default_hooks.checkpoint = None
        cfg.randomness = dict(seed=seed)
        runner = build_runner(cfg)
        model = runner.model.to(device)
        model.init_weights()
        model.train()
        if cuda:
            log(f'[fp16_headroom] the whole model under fp16 autocast on {device}')
        else:
            log('[fp16_headroom] CPU stand-in: the backbone under fp16 autocast (LayerNorm in '
                'float32, as on CUDA), neck and heads in float32')
            _fp16_backbone(model)
        recorder = Float16Gradients(model)
        steps = []
        batches = iter(runner.train_dataloader)
        for it in range(iters):
            data = model.data_preprocessor(next(batches), True)
            model.zero_grad(set_to_none=True)
            with ExitStack() as stack:
                stack.enter_context(recorder.recording())
                if cuda:
                    stack.enter_context(torch.autocast('cuda', dtype=torch.float16))
                loss, _ = model.parse_losses(model(**data, mode='loss'))
            loss.backward()
            headroom = recorder.headroom(top)
            steps.append(dict(input=list(data['inputs'].shape), loss=loss.item(),
                              tensors=headroom.tensors, parameters=headroom.parameters,
                              largest=headroom.largest, bound=headroom.bound))
            log(format_step(it, steps[-1]))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return dict(config=config, device=device, bound=min(s['bound'] for s in steps),
                steps=steps)


def format_step(index: int, step: dict) -> str:
    """The report of one step of ``measure_headroom``."""
    lines = [f'iteration {index}: input {tuple(step["input"])}, loss {step["loss"]:.4g}']
    for kind in ('tensors', 'parameters'):
        lines.append(f'  largest float16 gradients of {kind}:')
        lines += [f'    {value:10.3g}  {name}' for name, value in step[kind]]
    name, value = step['largest']
    lines.append(f'  largest {value:.3g} ({name}): loss scale bound {step["bound"]:g}')
    return '\n'.join(lines)
