"""The global branch under autocast: its input projection in float32."""
import pytest
import torch

from convneur_mm.models.layers.global_branch import GlobalBranch
from convneur_mm.models.layers.mixers import MIXERS
from .test_mixers import MEMORY, _small_cfg

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize('mixer', list(MIXERS))
@pytest.mark.parametrize('dtype', DTYPES, ids=['fp16', 'bf16'])
def test_input_projection_gradients_do_not_overflow_under_autocast(mixer, dtype, device='cpu'):
    """proj_in's bias gradient sums over every token the gradients that the
    memory's RMSNorms scale by 1/rms: on the COCO detector it was the largest
    float16 gradient of the network (4e3 at loss scale 1, which bounded
    dynamic loss scaling near 16). Where that sum exceeds 65504 it must stay
    finite and equal to float32's, so the projection runs in float32 and
    hands the mixer a float32 map (the memory computes in float32 anyway)."""
    torch.manual_seed(0)
    branch = GlobalBranch(16, 8, mixer, _small_cfg(mixer), **MEMORY).to(device)
    x = torch.randn(2, 16, 12, 16, device=device)
    upstream = torch.randn(2, 16, 12, 16, device=device) + 1
    proj_in_dtypes = []
    branch.proj_in.register_forward_hook(lambda m, i, o: proj_in_dtypes.append(o.dtype))

    def grads(amp=None):
        branch.zero_grad()
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            out = branch(x)
        (out.float() * upstream).sum().backward()
        return [branch.proj_in.weight.grad.clone(), branch.proj_in.bias.grad.clone()]

    upstream *= 2e5 / grads()[1].abs().max()  # proj_in's bias gradient: 2e5
    want = grads()
    got = grads(dtype)
    assert proj_in_dtypes[-1] == torch.float32
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        # the mixer's and proj_out's 16-bit rounding, summed over 384 tokens
        torch.testing.assert_close(g, w, rtol=0, atol=0.02 * w.abs().max().item())


def test_a_float64_branch_stays_float64_under_autocast():
    branch = GlobalBranch(16, 8, 'memory', **MEMORY).double()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = branch(torch.randn(1, 16, 6, 6, dtype=torch.float64))
    assert out.dtype == torch.float64
