"""The profile categories every benchmark tool sums its time by."""
import pytest
import torch

from convneur_mm.analysis import op_profile


@pytest.mark.torch_pinned
def test_profile_assigns_each_event_to_its_category():
    """Event names as torch 2.13 gives them."""
    conv, mm, compiled, mmcv, aten, other = [c for c, _ in op_profile.PROFILE_CATEGORIES] + [
        op_profile.OTHER_EVENTS]
    expected = {
        'aten::mkldnn_convolution': conv, 'aten::convolution_backward': conv,
        'aten::conv2d': conv, 'mkldnn::_convolution_pointwise': conv,
        'aten::conv_transpose2d': conv, 'aten::_slow_conv2d_forward': conv,
        'aten::mm': mm, 'aten::addmm': mm, 'aten::bmm': mm, 'aten::baddbmm': mm,
        'aten::linear': mm, 'mkldnn::_linear_pointwise': mm,
        'aten::_scaled_dot_product_flash_attention_for_cpu': mm,
        '## Call CompiledFxGraph fumxlanmrvjyss65yb25lfd ##': compiled,
        'CompiledFunction': compiled, 'CompiledFunctionBackward': compiled,
        'Torch-Compiled Region: 0/0': compiled, 'TorchDynamo Cache Lookup': compiled,
        'cpp_fused_add_gelu_0': compiled, 'triton_poi_fused_add_0': compiled,
        'RoIAlignFunction': mmcv, 'RoIAlignFunctionBackward': mmcv, 'NMSop': mmcv,
        'aten::gelu_backward': aten, 'aten::copy_': aten, 'aten::mean': aten,
        'aten::_convert_indices_from_coo_to_csr': aten, 'aten::mm_out_placeholder': aten,
        # the autograd engine's events around a backward op: overhead, not the op
        'autograd::engine::evaluate_function: ConvolutionBackward0': other,
        'autograd::engine::evaluate_function: AddmmBackward0': other,
        'AddmmBackward0': other, 'torch::autograd::AccumulateGrad': other, 'detach': other,
    }
    assert {name: op_profile.profile_category(name) for name in expected} == expected


def test_profile_sums_self_times_and_reads_device_time_on_cuda():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, cpu_us, device_us=0.0, device_type=DeviceType.CPU):
        return SimpleNamespace(key=key, self_cpu_time_total=cpu_us,
                               self_device_time_total=device_us, device_type=device_type)
    events = [event('aten::mkldnn_convolution', 3e6, 2e6), event('aten::mm', 1e6, 1e6),
              event('aten::addmm', 1e6), event('## Call CompiledFxGraph f0 ##', 0.5e6, 4e6),
              event('aten::add', 0.25e6), event('detach', 0.25e6),
              event('triton_poi_fused_add_0', 0, 4e6, DeviceType.CUDA)]  # in its launcher's
    cpu = op_profile.time_breakdown(events, cuda=False, wall=7.0)
    assert list(cpu.values()) == [3.0, 2.0, 0.5, 0.0, 0.25, 0.25, 1.0]
    assert list(cpu)[-1] == op_profile.OUTSIDE_EVENTS
    cuda = op_profile.time_breakdown(events, cuda=True)
    assert list(cuda.values()) == [2.0, 1.0, 4.0, 0.0, 0.0, 0.0]


def test_profile_finds_a_real_eager_steps_convolutions_and_products():
    """The names above are what the profiler really records (eager: no
    compilation in a unit test)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GELU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 14 * 14, 10))
    x = torch.randn(2, 3, 16, 16)
    seconds = op_profile.profile_call(lambda: model(x).square().mean().backward(), 'cpu')
    conv, mm, compiled, mmcv, aten = [c for c, _ in op_profile.PROFILE_CATEGORIES]
    assert seconds[conv] > 0 and seconds[mm] > 0 and seconds[aten] > 0
    assert seconds[compiled] == 0 and seconds[mmcv] == 0
