"""Helpers of the benchmark scripts in tools/analysis_tools."""
import pytest
import torch

from ..paths import import_analysis_tool


def test_best_round_takes_best_speed_and_largest_peak():
    rounds = [dict(name='M3', throughput=9.0, latency_ms=80.0, peak_mb=900, branch_time_share=0.5),
              dict(name='M3', throughput=11.0, latency_ms=95.0, peak_mb=850, branch_time_share=0.4),
              dict(name='M3', throughput=10.0, latency_ms=85.0, peak_mb=870, branch_time_share=0.6)]
    best = import_analysis_tool('benchmark_speed').best_round(rounds)
    assert best['throughput'] == 11.0 and best['branch_time_share'] == 0.4  # one round's
    assert best['latency_ms'] == 80.0 and best['peak_mb'] == 900 and best['rounds'] == 3
    assert rounds[1]['latency_ms'] == 95.0  # inputs untouched


def test_scaling_exponent_needs_sizes_that_differ():
    fit = import_analysis_tool('resolution_scaling').fit_exponent
    assert fit([(1024 * 1024, 1.0)]) is None
    assert fit([(1024 * 1024, 1.78), (800 * 1333, 2.07)]) is None  # 2% apart: noise
    assert abs(fit([(512 ** 2, 0.5), (1024 ** 2, 2.0), (2048 ** 2, 8.0)]) - 1.0) < 1e-9
    assert abs(fit([(512 ** 2, 1.0), (1024 ** 2, 16.0)]) - 2.0) < 1e-9


def test_memory_benchmark_counts_the_same_matrix_products_on_both_paths():
    """The speed-up bound printed by benchmark_memory rests on this: the
    closed-form path and the autograd reference run the same GEMM FLOPs."""
    import torch

    from convneur_mm.models.layers.neural_memory import NeuralMemory
    from ..test_models.test_layers.memory_reference import reference_memory
    bench = import_analysis_tool('benchmark_memory')
    torch.manual_seed(0)
    d, chunk, tokens = 16, 32, 128  # 4 chunks: 3 updates that are read
    memory = NeuralMemory(d, chunk_size=chunk)
    x = torch.randn(2, tokens, d, requires_grad=True)
    paths = {'fast': lambda m, t: m(t), 'reference': reference_memory}
    flops = {name: bench.gemm_flops(lambda: bench._step(memory, fn, x, 'cpu'))
             for name, fn in paths.items()}
    # forward alone: 5 (L x d x 4d) products per update, 2 per token read
    assert flops['fast'] > 2 * 2 * (3 * chunk * 5 + 2 * tokens) * d * 4 * d
    # the fast path adds only its scan's small products ((U+1) x U per weight)
    assert abs(flops['fast'] - flops['reference']) <= 0.05 * flops['reference'], flops
    assert 0 < bench.gemm_seconds(lambda: bench._step(memory, paths['fast'], x, 'cpu'), 'cpu') < 10


def test_speed_report_bounds_m3_by_its_branches_gemms():
    bench = import_analysis_tool('benchmark_speed')
    common = dict(params=1e7, latency_ms=50.0, peak_mb=100)
    results = [
        dict(name='ConvNeur-M3 local-only', paper_macs=1.4e9, full_macs=1.4e9, throughput=20.0,
             branch_time_share=None, branch_mac_share=None, **common),
        dict(name='ConvNeur-M3', paper_macs=1.8e9, full_macs=3.5e9, throughput=10.0,
             branch_time_share=0.5, branch_mac_share=0.6, **common),
        dict(name='ResNet-50', paper_macs=4.1e9, full_macs=4.1e9, throughput=10.0,
             branch_time_share=None, branch_mac_share=None, **common)]
    # branches: 0.6 * 3.5 = 2.1 GMACs = 4.2 GFLOP per image; at 84 GFLOP/s 50 ms,
    # on top of the local network's 50 ms: at most 10 img/s
    assert abs(bench.m3_throughput_bound(20.0, 2.1e9, 84e9) - 10.0) < 1e-9
    text = bench.report(results, 'test device', 16, gemm_rate=84e9)
    assert 'ConvNeur-M3 <= 10.0 img/s = 1.00x ResNet-50' in text
    assert 'wall-time overhead >= 100%' in text
    assert 'Bound' not in bench.report(results, 'test device', 16)


def test_speed_report_gives_each_mode_its_own_bound_and_fraction():
    bench = import_analysis_tool('benchmark_speed')

    def row(name, mode, throughput, **extra):
        branches = name == 'ConvNeur-M3'
        return dict(name=name, mode=mode, params=1e7, latency_ms=50.0, peak_mb=100,
                    paper_macs=1.8e9 if branches else 1.4e9,
                    full_macs=3.5e9 if branches else 1.4e9, throughput=throughput,
                    branch_time_share=0.5 if branches and mode == 'eager' else None,
                    branch_mac_share=0.6 if branches else None, warm_up_s=40.0, **extra)
    results = [row('ConvNeur-M3 local-only', 'eager', 20.0), row('ConvNeur-M3', 'eager', 9.0),
               row('ConvNeur-M3 local-only', 'compiled', 25.0),
               row('ConvNeur-M3', 'compiled', 10.0),
               row('ConvNeur-M3', 'bf16', 12.0, relative_error=0.005)]
    text = bench.report(results, 'test device', 16, gemm_rate=84e9)
    # eager: 1 / (1/20 + 4.2e9/84e9) = 10 img/s; compiled: 1 / (1/25 + 0.05) = 11.1
    assert 'ConvNeur-M3 measured / bound (eager): 9.0 / 10.0 = 0.90' in text
    assert 'ConvNeur-M3 measured / bound (compiled): 10.0 / 11.1 = 0.90' in text
    assert 'bound (bf16)' not in text  # a float32 bound says nothing about bf16
    assert '| ConvNeur-M3 | 9.0 | 10.0 | 12.0 | 1.11x | 1.33x | 0.50% | 40 |' in text


def test_global_branch_timer_records_events_on_the_benchmark_device(monkeypatch):
    """On CUDA the branches are timed by events on the device's stream, read
    after a synchronize of that device (here cuda:1, stubbed)."""
    from convneur_mm.models.layers.global_branch import GlobalBranch
    from ..test_utils.test_bench_env import _FakeCuda
    bench = import_analysis_tool('benchmark_speed')
    model = torch.nn.Sequential(GlobalBranch(8, 8, chunk_size=4), GlobalBranch(8, 8, chunk_size=4))
    cuda = _FakeCuda(monkeypatch, [0.0, 1.0, 5.0, 5.25])  # two branches: 1 s and 0.25 s
    with torch.no_grad():
        seconds = bench._global_branch_seconds(model, model, torch.randn(1, 8, 4, 4), 'cuda:1')
    assert seconds == pytest.approx(1.25)
    second = torch.device('cuda:1')
    assert cuda.calls == [('record', ('stream', second))] * 4 + [('synchronize', second)]
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # removed


def test_memory_benchmark_skips_titans_with_a_message_when_absent(monkeypatch):
    import sys
    bench = import_analysis_tool('benchmark_memory')
    monkeypatch.setitem(sys.modules, 'titans_pytorch', None)  # import fails
    module, message = bench.titans_memory(16, 4)
    assert module is None and 'requirements/optional/titans.txt' in message


def test_compile_profile_assigns_each_event_to_its_category():
    """benchmark_compile --profile: event names as torch 2.13 gives them."""
    bench = import_analysis_tool('benchmark_compile')
    conv, mm, compiled, mmcv, aten, other = [c for c, _ in bench.PROFILE_CATEGORIES] + [
        bench.OTHER_EVENTS]
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
    assert {name: bench.profile_category(name) for name in expected} == expected


def test_compile_profile_sums_self_times_and_reads_device_time_on_cuda():
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    bench = import_analysis_tool('benchmark_compile')

    def event(key, cpu_us, device_us=0.0, device_type=DeviceType.CPU):
        return SimpleNamespace(key=key, self_cpu_time_total=cpu_us,
                               self_device_time_total=device_us, device_type=device_type)
    events = [event('aten::mkldnn_convolution', 3e6, 2e6), event('aten::mm', 1e6, 1e6),
              event('aten::addmm', 1e6), event('## Call CompiledFxGraph f0 ##', 0.5e6, 4e6),
              event('aten::add', 0.25e6), event('detach', 0.25e6),
              event('triton_poi_fused_add_0', 0, 4e6, DeviceType.CUDA)]  # in its launcher's
    cpu = bench.time_breakdown(events, cuda=False, wall=7.0)
    assert list(cpu.values()) == [3.0, 2.0, 0.5, 0.0, 0.25, 0.25, 1.0]
    assert list(cpu)[-1] == bench.OUTSIDE_EVENTS
    cuda = bench.time_breakdown(events, cuda=True)
    assert list(cuda.values()) == [2.0, 1.0, 4.0, 0.0, 0.0, 0.0]
    table = bench.breakdown_table('train', cpu, cpu)
    assert '| convolutions | 3.000 s (43%) | 3.000 s (43%) | +0.000 s |' in table


def test_compile_profile_finds_a_real_eager_steps_convolutions_and_products():
    """The names above are what the profiler really records (eager: no
    compilation in a unit test)."""
    bench = import_analysis_tool('benchmark_compile')
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GELU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 14 * 14, 10))
    x = torch.randn(2, 3, 16, 16)
    seconds = bench.profile_call(lambda: model(x).square().mean().backward(), 'cpu')
    conv, mm, compiled, mmcv, aten = [c for c, _ in bench.PROFILE_CATEGORIES]
    assert seconds[conv] > 0 and seconds[mm] > 0 and seconds[aten] > 0
    assert seconds[compiled] == 0 and seconds[mmcv] == 0
