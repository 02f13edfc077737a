"""autocast_dtype: what the float32 layers cast their outputs back to."""
import pytest
import torch

from convneur_mm.models.layers.precision import autocast_dtype, autocast_off


def test_none_without_autocast_and_on_devices_without_it():
    assert autocast_dtype('cpu') is None and autocast_dtype('meta') is None


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_the_dtype_of_the_device_whose_autocast_is_on(dtype):
    with torch.autocast('cpu', dtype=dtype):
        assert autocast_dtype('cpu') == dtype
        assert autocast_dtype('cuda') is None  # another device type's autocast is off


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
