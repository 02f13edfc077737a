"""Mixed precision on the CPU: bfloat16 autocast, no loss scaling needed."""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from torch import nn

from convneur_mm.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CpuAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under ``torch.autocast('cpu', bf16)``.

    MMEngine's ``AmpOptimWrapper`` requires a GPU; ``tools/train.py --amp``
    picks this wrapper on CPU-only machines. bfloat16 has float32's exponent
    range, so gradients need no scaling. The neural memory's inner loop opts
    out of autocast and stays in float32.
    """

    def __init__(self, *args, dtype: str = 'bfloat16', **kwargs):
        super().__init__(*args, **kwargs)
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model: nn.Module):
        check_on_cpu(model)
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield


def check_on_cpu(model: nn.Module) -> None:
    """CPU autocast leaves a GPU's tensors alone: a config dumped by a CPU
    ``--amp`` run (this wrapper's type in it) would train on a GPU in float32
    without a word."""
    devices = {p.device.type for p in model.parameters()} - {'cpu'}
    if devices:
        raise ValueError(f'convneur_mm.CpuAmpOptimWrapper autocasts on the CPU only, but the '
                         f'model is on {sorted(devices)}: drop optim_wrapper.type from the '
                         'config (a CPU --amp run dumped it) and pass --amp on this machine')
