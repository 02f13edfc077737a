"""--amp on the CPU: bf16 autocast in the forward, float32 master weights."""
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

import convneur_mm.engine  # noqa: F401  (registers CpuAmpOptimWrapper)


def test_cpu_amp_wrapper_autocasts_forward_and_updates_fp32_weights():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    wrapper = build_optim_wrapper(model, dict(
        type='convneur_mm.CpuAmpOptimWrapper', optimizer=dict(type='SGD', lr=0.1)))
    before = model[0].weight.detach().clone()
    with wrapper.optim_context(model):
        out = model(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16
    wrapper.update_params(out.float().square().mean())
    assert model[0].weight.dtype == torch.float32
    assert not torch.equal(before, model[0].weight)


def test_cpu_amp_wrapper_refuses_a_model_off_the_cpu():
    """A config dumped by a CPU ``--amp`` run names this wrapper; on a GPU its
    CPU autocast would do nothing (float32 training, silently). The meta
    device stands in for CUDA."""
    import pytest
    model = nn.Linear(8, 1)
    wrapper = build_optim_wrapper(model, dict(
        type='convneur_mm.CpuAmpOptimWrapper', optimizer=dict(type='SGD', lr=0.1)))
    model.to('meta')
    with pytest.raises(ValueError, match=r"autocasts on the CPU only.*\['meta'\]"):
        with wrapper.optim_context(model):
            pass
