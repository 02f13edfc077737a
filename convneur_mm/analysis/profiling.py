"""Activation memory of a training step, measured on any device.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU has no allocator
statistics, and process-level figures (RSS) mix in the allocator's caching
and everything else the process holds. What gradient checkpointing changes is
the memory autograd keeps between forward and backward: the tensors saved for
the backward pass. ``SavedTensorMeter`` counts them through
``torch.autograd.graph.saved_tensors_hooks``: the bytes of the unique storages
saved while it is active (parameters excluded: they are held anyway), in total
and per named scope (e.g. per block), which is the activation memory at the
end of the forward pass, the peak of a training step but for the transient
buffers of single operations. With non-reentrant checkpointing
(``torch.utils.checkpoint(use_reentrant=False)``) a checkpointed block's inputs
are saved through the hooks and counted, its inner activations are not (they
are recomputed in the backward pass).
"""
from collections import defaultdict
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from convneur_mm.analysis.timing import PeakMemoryGrowth, is_cuda


class SavedTensorMeter:
    """Context manager: bytes of the storages autograd saves inside it.

    Args:
        exclude: tensors whose storages are not counted (e.g. parameters).
        scopes: name -> module; a storage first saved while a module runs is
            also counted in ``by_scope[name]``.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (),
                 scopes: Optional[Dict[str, nn.Module]] = None):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._scopes = scopes or {}
        self._seen: Dict[int, int] = {}
        self._scope_stack = []
        self.by_scope: Dict[str, int] = defaultdict(int)
        self._handles = []
        self._hooks = None

    @property
    def total_bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self._exclude and key not in self._seen:
            self._seen[key] = storage.nbytes()
            if self._scope_stack:
                self.by_scope[self._scope_stack[-1]] += storage.nbytes()
        return tensor

    def __enter__(self) -> 'SavedTensorMeter':
        def enter(name):
            self._scope_stack.append(name)

        def leave():
            self._scope_stack.pop()

        for name, module in self._scopes.items():
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: enter(name)))
            self._handles.append(module.register_forward_hook(lambda m, args, out: leave()))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def outputs_loss(outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A loss on every output of a backbone, so that backward reaches all stages."""
    return sum(o.float().square().mean() for o in outs)


def measure_memory(backbone: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Activation memory of one forward + backward step of a ConvNeur backbone.

    Args:
        backbone: a ConvNeur (``stages`` of blocks) in training mode.
        x: the input batch, on the backbone's device.

    Returns:
        ``saved``: bytes autograd saves for the backward pass (parameters
        excluded); ``largest_block``: the most of them saved by one block, held
        a second time while that block's backward runs (or recomputes it, with
        ``with_cp``); on CUDA also ``cuda_peak``: the allocator's peak over the
        step, less what was allocated before it.
    """
    blocks = {f'stage{i}.block{j}': block for i, stage in enumerate(backbone.stages)
              for j, block in enumerate(stage)}
    backbone.zero_grad(set_to_none=True)
    with SavedTensorMeter(exclude=backbone.parameters(), scopes=blocks) as meter:
        loss = outputs_loss(backbone(x))
    saved, largest = meter.total_bytes, max(meter.by_scope.values(), default=0)
    loss.backward()
    result = dict(saved=saved, largest_block=largest)
    if is_cuda(x.device):
        backbone.zero_grad(set_to_none=True)
        window = PeakMemoryGrowth(x.device)
        outputs_loss(backbone(x)).backward()
        result['cuda_peak'] = window.bytes()
    return result
