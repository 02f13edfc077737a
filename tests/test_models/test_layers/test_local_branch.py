"""GRN's spatial norm: ``spatial_l2_norm`` replaces ``torch.linalg.vector_norm``
over H and W for speed, and must give its values and gradients (a channel
that is zero everywhere included), in float64 too, for 16-bit maps whose
squares overflow, under autocast, and on meta tensors. Where the dtype
differs (CPU autocast: float32 where ``vector_norm`` gave bfloat16), GRN's
output does not."""
import pytest
import torch

from convneur_mm.models.layers.local_branch import GRN, spatial_l2_norm
from ...devices import DEVICES

SHAPES = [(2, 7, 5, 16), (3, 1, 9, 8), (1, 56, 56, 64)]


def reference_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)


def reference_grn(grn: GRN, x: torch.Tensor) -> torch.Tensor:
    gx = reference_norm(x)
    return grn.gamma * (x * (gx / (gx.mean(dim=-1, keepdim=True) + grn.eps))) + grn.beta + x


def random_grn(channels: int, device: str) -> GRN:
    grn = GRN(channels).to(device)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    return grn


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('device', DEVICES)
def test_spatial_norm_equals_vector_norm(shape, device):
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


@pytest.mark.parametrize('device', DEVICES)
def test_spatial_norm_in_float64_is_float64(device):
    """No round trip through float32: float64 values and a gradcheck."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    norm = spatial_l2_norm(x)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, reference_norm(x), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(spatial_l2_norm, (x,))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('device', DEVICES)
def test_spatial_norm_of_16bit_maps_does_not_overflow(dtype, device):
    """|x| = 300 squares to 9e4, beyond float16's 65504: squaring in float16
    would give inf. The result keeps the input's dtype, as ``vector_norm``
    does, and agrees with the float32 norm to the dtype's rounding, also
    over a large map."""
    x = torch.full((2, 4, 4, 8), 300.0, device=device).to(dtype)
    norm = spatial_l2_norm(x)
    assert norm.dtype == dtype and torch.isfinite(norm).all()
    torch.testing.assert_close(norm.float(), torch.full_like(norm.float(), 1200.0))
    torch.testing.assert_close(norm, reference_norm(x))
    torch.manual_seed(0)
    big = torch.rand(2, 56, 56, 8, device=device).to(dtype) + 0.5
    torch.testing.assert_close(spatial_l2_norm(big).float(), reference_norm(big.float()),
                               rtol=2 ** -8, atol=0)


@pytest.mark.parametrize('device', DEVICES)
def test_bfloat16_maps_are_saved_for_backward_in_bfloat16(device):
    """bf16 ``--amp`` training: autograd keeps the bfloat16 map, not a float32
    copy of GRN's largest activation (on CUDA, where autocast runs ``pow`` in
    float32, it kept one: the ``cuda`` case checks that)."""
    x = torch.randn(2, 14, 14, 64, device=device).to(torch.bfloat16).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    with torch.autocast(device, dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spatial_l2_norm(x)
    full_maps = [dtype for shape, dtype in saved if shape == (2, 14, 14, 64)]
    assert full_maps and all(dtype == torch.bfloat16 for dtype in full_maps)


@pytest.mark.torch_pinned
def test_bfloat16_map_meets_no_op_that_cuda_autocast_widens():
    """The same under CUDA ``--amp --amp-dtype bfloat16``: an op on CUDA
    autocast's float32 list (``pow`` is; CPU autocast has no rule for it)
    would receive, and save, a float32 copy of the map. Read from the
    dispatcher's table, so it runs without a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.randn(2, 14, 14, 64).to(torch.bfloat16).requires_grad_(True)
    on_map = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(a, torch.Tensor) and a.shape == x.shape for a in args):
                overload = func._overloadname
                on_map.append(func._schema.name + ('' if overload == 'default' else f'.{overload}'))
            return func(*args, **(kwargs or {}))

    with Record():
        spatial_l2_norm(x)
    widened = [op for op in on_map
               if torch._C._dispatch_has_kernel_for_dispatch_key(op, 'AutocastCUDA')
               and not op.startswith('aten::sum')]  # sum saves no input: its copy is transient
    assert on_map and not widened, on_map


@pytest.mark.parametrize('device', DEVICES)
def test_zero_channel_has_the_gradient_vector_norm_gives(device):
    """sqrt's derivative at 0 is infinite: without care a channel that is
    zero everywhere (fp16 GELU of inputs below about -6 rounds to 0) gets a
    NaN gradient, and a NaN weight update."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 8, device=device)
    x[..., 3] = 0.0
    x[1, ..., 5] = 0.0
    x.requires_grad_(True)
    weights = torch.randn(2, 1, 1, 8, device=device)
    norm = spatial_l2_norm(x)
    assert (norm[:, 0, 0, 3] < 1e-18).all() and norm[1, 0, 0, 5] < 1e-18
    grad, = torch.autograd.grad((norm * weights).sum(), x)
    want, = torch.autograd.grad((reference_norm(x) * weights).sum(), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, want)
    grn = random_grn(8, device)
    out_grad, = torch.autograd.grad(grn(x).sum(), x)
    ref_grad, = torch.autograd.grad(reference_grn(grn, x).sum(), x)
    assert torch.isfinite(out_grad).all()
    torch.testing.assert_close(out_grad, ref_grad)


def test_spatial_norm_on_meta_tensors():
    """Shape tools run models on the meta device, which has no autocast."""
    norm = spatial_l2_norm(torch.empty(2, 7, 5, 16, device='meta'))
    assert norm.shape == (2, 1, 1, 16) and norm.device.type == 'meta'


@pytest.mark.parametrize('device', DEVICES)
def test_grn_under_autocast_matches_vector_norm(device):
    """GRN on a 16-bit map under autocast (bfloat16 on CPU, float16 on CUDA),
    as ``--amp`` runs it: a float32 output, as with ``vector_norm`` under the
    same autocast, and at least as close as that to the float32 definition
    on the same 16-bit input (on CPU ``vector_norm`` rounds the norm to
    bfloat16). The norm itself is float32 under autocast."""
    torch.manual_seed(0)
    low = torch.bfloat16 if device == 'cpu' else torch.float16
    grn = random_grn(16, device)
    x = (torch.randn(2, 9, 7, 16, device=device) * 3).to(low)
    with torch.autocast(device_type=torch.device(device).type, dtype=low):
        norm = spatial_l2_norm(x)
        out, want = grn(x), reference_grn(grn, x)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, reference_norm(x.float()), rtol=2 ** -8, atol=0)
    assert out.dtype == want.dtype == torch.float32
    exact = reference_grn(grn, x.float())
    torch.testing.assert_close(out, exact, rtol=2 ** -7, atol=2 ** -7)
    slack = 1e-5 + 1e-6 * exact.abs().max()  # float32 steps where want is exact
    assert (out - exact).abs().max() <= (want - exact).abs().max() + slack


@pytest.mark.parametrize('device', DEVICES)
def test_grn_matches_its_definition(device):
    """ConvNeXt-V2's GRN: gamma * (x * N(x)) + beta + x with
    N(x) = ||x||_HW / mean_C ||x||_HW, forward and backward."""
    torch.manual_seed(0)
    grn = random_grn(16, device)
    x = torch.randn(2, 9, 7, 16, device=device, requires_grad=True)
    expected = reference_grn(grn, x)
    out = grn(x)
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (x, grn.gamma))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (x, grn.gamma))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
