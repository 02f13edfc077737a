"""Autocast-aware precision: which autocast is in force, running a function
in float32 under it (sums that 16-bit types overflow or round away), and the
modules that keep float32 weights when the model is cast to 16 bits.
"""
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# device types with autocast in every supported torch: no availability query
# for them (torch 2.11's Dynamo cannot trace `torch._C._is_autocast_available`
# and would break the graph in GRN's norm; 2.13's can)
ALWAYS_AUTOCAST = ('cpu', 'cuda')


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on this device type, None where it is off
    (or the device type has no autocast, e.g. ``meta``)."""
    if device_type not in ALWAYS_AUTOCAST and not torch.amp.is_autocast_available(device_type):
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str) -> ContextManager:
    """A context with this device type's autocast off: none where it is off
    already or the device type has none (``torch.autocast`` refuses ``meta``)."""
    if autocast_dtype(device_type) is None:
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit floating dtypes, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def in_float32(fn: Callable[[Tensor], Tensor], x: Tensor,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``fn(x)`` computed in float32 (float64 stays float64) with autocast
    off, the result cast to ``out_dtype`` (default: ``x``'s dtype)."""
    with autocast_off(x.device.type):
        out = fn(x.to(at_least_float32(x.dtype)))
    return out.to(out_dtype or x.dtype)


class KeepsFloat32:
    """Mixin for a module that computes in float32 (``in_float32``): casting
    the model to 16 bits (``.half()``, ``.bfloat16()``, ``.to(torch.float16)``)
    leaves its floating parameters, gradients and buffers float32, as
    autocast would run them, so that a 16-bit model runs (inputs are cast to
    float32 on the way in, outputs back on the way out) instead of failing
    with a dtype mismatch in float32 maths on 16-bit weights (a float64
    module cast to 16 bits becomes float32). Casts to float64 and moves
    between devices apply as usual. A parameter shared with a module outside
    (ConvNeur ties none) is cast with that module."""

    def _apply(self, fn, recurse=True):
        # the float32 originals, re-placed after the cast (not cast back from
        # 16 bits, which would round them)
        wide = {(id(module), key): (t.detach(), _detached(t.grad))
                for module in self.modules() for key, t in _floating(module)
                if not _narrow(t)}
        super()._apply(fn, recurse)
        for module in self.modules():
            for key, t in _floating(module):
                if (id(module), key) in wide and _narrow(t):
                    _restore(module, key, *wide[id(module), key])
        return self


def _narrow(t: Tensor) -> bool:
    """A floating tensor narrower than float32 (float16, bfloat16, ...)."""
    return t.is_floating_point() and t.dtype.itemsize < 4


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def _floating(module: nn.Module):
    """(key, tensor) for the module's own floating parameters and buffers."""
    for key, t in (*module._parameters.items(), *module._buffers.items()):
        if t is not None and t.is_floating_point():
            yield key, t


def _restore(module: nn.Module, key: str, original: Tensor, grad: Optional[Tensor]) -> None:
    """Put ``original`` back in float32, on the device the cast moved it to."""
    if key not in module._parameters:
        module._buffers[key] = original.to(module._buffers[key].device, torch.float32)
        return
    param = module._parameters[key]
    param.data = original.to(param.device, torch.float32)
    if grad is not None:
        param.grad = grad.to(param.device, torch.float32)


def narrowed_parameters(module: nn.Module) -> Dict[str, Tensor]:
    """The module's 16-bit parameters. Under a float32 module (``KeepsFloat32``)
    they come from a cast behind its back: FSDP's mixed precision hands every
    module its parameters in that dtype during the forward, registered
    parameters under FSDP2 (``MixedPrecisionPolicy``), plain tensor
    attributes under FSDP1 (``MixedPrecision``, MMEngine's
    ``MMFullyShardedDataParallel`` and ``FSDPStrategy``).

    Layers that widen their own operands (``widens_own_operands``: the
    ``Float32*`` layers) are left to do so: where FSDP1 makes them units of
    their own, the 16-bit views it left on them after their last call have
    no storage until it calls them again (``.float()`` of one raised "data
    is not allocated yet" at the second forward)."""
    found: Dict[str, Tensor] = {}
    _collect_narrowed(module, '', found)
    return found


def _collect_narrowed(m: nn.Module, prefix: str, found: Dict[str, Tensor]) -> None:
    """``narrowed_parameters`` of ``m`` (named under ``prefix``) into ``found``,
    pruned at the layers that widen their own: one visit per module on every
    forward, cheaper than a prefix test against each such layer
    (docs/notes/investigations.md#smaller-decisions-in-the-model)."""
    if getattr(m, 'widens_own_operands', False):
        return
    if torch.compiler.is_compiling():
        # torch 2.11's Dynamo cannot trace vars(module); compiled
        # FSDP1 needs use_orig_params, whose plain attributes shadow the
        # registered parameters of the same names: getattr finds them
        attributes = ((k, getattr(m, k)) for k in m._parameters)
    else:
        attributes = ((k, v) for k, v in vars(m).items() if isinstance(v, Tensor))
    for key, t in (*m._parameters.items(), *attributes):
        # not FSDP1's own flat parameter (``_flat_param``), the others' storage
        if t is not None and _narrow(t) and not key.startswith('_'):
            found[f'{prefix}.{key}' if prefix else key] = t
    for name, child in m._modules.items():
        if child is not None:
            _collect_narrowed(child, f'{prefix}.{name}' if prefix else name, found)


@contextmanager
def widened(module: nn.Module, narrowed: Dict[str, Tensor]) -> Iterator[None]:
    """The ``narrowed`` tensors (``narrowed_parameters``) replaced by float32
    copies (gradients flow back to them) inside the context, where the
    module's code finds them: a plain attribute shadows a registered
    parameter of the same name (FSDP1 with ``use_orig_params``)."""
    swapped = []
    try:
        for name, t in narrowed.items():
            owner_name, _, key = name.rpartition('.')
            owner = module.get_submodule(owner_name)
            table = vars(owner) if key in vars(owner) else owner._parameters
            swapped.append((table, key, table[key]))
            table[key] = t.float()
        yield
    finally:
        for table, key, original in reversed(swapped):
            table[key] = original


def float32_operands(x: Tensor, *weights: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """``x`` in float32 (float64 stays) and ``weights`` in its dtype, for a
    layer of float32 maths whose operands FSDP's mixed precision may hand
    over in 16 bits: its weights (``param_dtype``), and under FSDP2 its input
    too when the layer is a unit of its own (``cast_forward_inputs``)."""
    x = x.to(at_least_float32(x.dtype))
    return (x, *(w if w is None or w.dtype == x.dtype else w.to(x.dtype) for w in weights))


class Float32Conv2d(KeepsFloat32, nn.Conv2d):
    """A Conv2d that computes in float32: the stem's conv, a global branch's
    input projection (their callers run them ``in_float32``). Its weights
    stay float32 when the model is cast to 16 bits, and 16-bit operands from
    FSDP's mixed precision are widened (``float32_operands``)."""
    widens_own_operands = True

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(*float32_operands(x, self.weight, self.bias))


class Float32Linear(nn.Linear):
    """A Linear that computes in float32, inside float32 maths (the memory's,
    a ``KeepsFloat32`` module), also when FSDP's mixed precision makes it a
    unit of its own (an auto-wrap policy that wraps Linear layers) and hands
    over 16-bit operands only when it is called (``float32_operands``)."""
    widens_own_operands = True

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(*float32_operands(x, self.weight, self.bias))


class Float32RMSNorm(nn.RMSNorm):
    """An RMSNorm that computes in float32, as ``Float32Linear``."""
    widens_own_operands = True

    def forward(self, x: Tensor) -> Tensor:
        x, weight = float32_operands(x, self.weight)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)
