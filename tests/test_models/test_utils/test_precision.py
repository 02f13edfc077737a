"""autocast_dtype: what the float32 layers cast their outputs back to;
KeepsFloat32: their weights under a cast of the model to 16 bits."""
import pytest
import torch

from torch import nn

from convneur_mm.models.utils.precision import (Float32Conv2d, at_least_float32, autocast_dtype,
                                               autocast_off, in_float32)


@pytest.mark.parametrize('dtype, wide', [(torch.float16, torch.float32),
                                         (torch.bfloat16, torch.float32),
                                         (torch.float32, torch.float32),
                                         (torch.float64, torch.float64)])
def test_at_least_float32_widens_16_bits_only(dtype, wide):
    assert at_least_float32(dtype) == wide


def test_none_without_autocast_and_on_devices_without_it():
    assert autocast_dtype('cpu') is None and autocast_dtype('meta') is None


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_the_dtype_of_the_device_whose_autocast_is_on(dtype):
    with torch.autocast('cpu', dtype=dtype):
        assert autocast_dtype('cpu') == dtype
        assert autocast_dtype('cuda') is None  # another device type's autocast is off


@pytest.mark.torch_pinned
def test_traced_without_graph_breaks():
    def cast(x):
        dtype = autocast_dtype(x.device.type)
        return x if dtype is None else x.to(dtype)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(cast)(torch.randn(3))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_autocast_off_turns_the_devices_autocast_off_and_accepts_meta():
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with autocast_off('cpu'):
            assert not torch.is_autocast_enabled('cpu')
        assert torch.is_autocast_enabled('cpu')
    with autocast_off('meta'):  # torch.autocast refuses meta
        pass


class _Float32Sum(Float32Conv2d):
    """A float32 conv with a buffer and a nested module (both kept float32)."""

    def __init__(self):
        super().__init__(3, 4, 1)
        self.register_buffer('scale', torch.full((4, ), 2.0))
        self.inner = nn.Linear(4, 4)


@pytest.mark.parametrize('cast', [lambda m: m.half(), lambda m: m.bfloat16(),
                                  lambda m: m.to(torch.float16)],
                         ids=['half', 'bfloat16', 'to-float16'])
def test_16_bit_casts_leave_float32_modules_float32(cast):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _Float32Sum())
    model[1].weight.grad = torch.ones_like(model[1].weight)
    cast(model)
    assert model[0].weight.dtype in (torch.float16, torch.bfloat16)  # others are cast
    kept = [*model[1].parameters(), *model[1].buffers(), model[1].weight.grad]
    assert all(t.dtype == torch.float32 for t in kept)


def test_wider_casts_and_moves_apply_as_usual():
    model = _Float32Sum().double()
    assert all(t.dtype == torch.float64 for t in (*model.parameters(), *model.buffers()))
    model.half()  # float64 cast to 16 bits: float32, what in_float32 computes in
    assert all(t.dtype == torch.float32 for t in (*model.parameters(), *model.buffers()))
    model.float().to('meta')
    assert all(t.dtype == torch.float32 and t.is_meta for t in model.parameters())


def test_a_16_bit_model_runs_through_the_float32_module():
    """Its input cast to float32, its output back: the 16-bit model's
    dtype flows on, and the weights did not lose precision to the cast."""
    torch.manual_seed(0)
    conv = Float32Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 5, 5).half().float()  # exact in float16
    want = conv(x)
    conv.weight.data += 1e-4  # not representable near 0.5 in float16 (2.4e-4 apart)
    want_shifted = conv(x)
    out = in_float32(conv.half(), x.half())
    assert out.dtype == torch.float16
    assert not torch.equal(want, want_shifted)
    torch.testing.assert_close(out.float(), want_shifted.half().float(), rtol=0, atol=0)


def test_narrowed_parameters_skips_the_layers_that_widen_their_own():
    """FSDP's 16-bit parameters: registered ones and plain attributes (FSDP1)
    of every module down the tree, but none inside a ``Float32*`` layer
    (which widens its own) nor FSDP1's ``_flat_param``."""
    from convneur_mm.models.utils.precision import (Float32Linear, narrowed_parameters,
                                                   widened)
    inner = nn.Sequential(nn.Linear(2, 2), Float32Linear(2, 2))
    inner[1].extra = nn.Linear(2, 2)  # a child of a widening layer: left to it
    root = nn.Module()
    root.block = inner
    root.scale = nn.Parameter(torch.ones(2))
    root.to(torch.bfloat16)
    inner[1].float()  # stays float32 as its own layer would
    inner[1].weight.data = inner[1].weight.data.bfloat16()  # FSDP's 16-bit hand-over
    inner[1].extra.bfloat16()
    inner[0].shadow = torch.ones(2, dtype=torch.float16)  # FSDP1: a plain attribute
    inner[0]._flat_param = torch.ones(2, dtype=torch.float16)
    found = narrowed_parameters(root)
    assert set(found) == {'scale', 'block.0.weight', 'block.0.bias', 'block.0.shadow'}
    with widened(root, found):
        assert root.scale.dtype == torch.float32 and inner[0].shadow.dtype == torch.float32
    assert root.scale.dtype == torch.bfloat16 and inner[0].shadow.dtype == torch.float16
