"""GRN's spatial norm: ``spatial_l2_norm`` must be ``torch.linalg.vector_norm``
over H and W in value and in dtype (it replaces it for speed), also for 16-bit
maps whose squares overflow and under autocast."""
import pytest
import torch

from convneur_mm.models.layers.local_branch import GRN, spatial_l2_norm

SHAPES = [(2, 7, 5, 16), (3, 1, 9, 8), (1, 56, 56, 64)]


def reference_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)


@pytest.mark.parametrize('shape', SHAPES)
def test_spatial_norm_equals_vector_norm(shape, device='cpu'):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device) * 3
    norm = spatial_l2_norm(x)
    assert norm.shape == (shape[0], 1, 1, shape[-1]) and norm.dtype == torch.float32
    torch.testing.assert_close(norm, reference_norm(x), rtol=1e-6, atol=0)
    # one spatial position changed moves only its own image and channel
    y = x.clone()
    y[1 % shape[0], 0, 0, 3] += 10.0
    changed = (spatial_l2_norm(y) != norm).nonzero().tolist()
    assert changed == [[1 % shape[0], 0, 0, 3]]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_spatial_norm_of_16bit_maps_does_not_overflow(dtype, device='cpu'):
    """|x| = 300 squares to 9e4, beyond float16's 65504: squaring in the
    input's dtype would give inf. The result keeps the input's dtype, as
    ``vector_norm`` does, and agrees with it to the dtype's rounding."""
    x = torch.full((2, 4, 4, 8), 300.0, device=device).to(dtype)
    norm = spatial_l2_norm(x)
    assert norm.dtype == dtype and torch.isfinite(norm).all()
    torch.testing.assert_close(norm.float(), torch.full_like(norm.float(), 1200.0))
    torch.testing.assert_close(norm, reference_norm(x))


def test_spatial_norm_under_autocast_is_float32(device='cpu'):
    """Under autocast the norm is float32 (``vector_norm`` is a float32 op of
    CUDA's autocast), and the GRN's output follows it as before."""
    x = torch.randn(2, 5, 6, 8, device=device)
    low = torch.bfloat16 if device == 'cpu' else torch.float16
    with torch.autocast(device_type=torch.device(device).type, dtype=low):
        norm = spatial_l2_norm(x.to(low))
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, reference_norm(x.to(low).float()))


def test_grn_matches_its_definition(device='cpu'):
    """ConvNeXt-V2's GRN: gamma * (x * N(x)) + beta + x with
    N(x) = ||x||_HW / mean_C ||x||_HW, forward and backward."""
    torch.manual_seed(0)
    grn = GRN(16).to(device)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 9, 7, 16, device=device, requires_grad=True)
    gx = reference_norm(x)
    expected = grn.gamma * (x * (gx / (gx.mean(dim=-1, keepdim=True) + grn.eps))) + grn.beta + x
    out = grn(x)
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (x, grn.gamma))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (x, grn.gamma))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
