"""Helpers of the benchmark scripts in tools/analysis_tools."""
import pytest
import torch

from ..markdown import table_rows
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


def test_resolution_measure_reports_the_fastest_timed_forward(monkeypatch):
    """One forward warms up and is not timed; the fastest timed one counts."""
    tool = import_analysis_tool('resolution_scaling')
    calls = []
    monkeypatch.setattr(tool, 'time_calls', lambda fn, repeats, device, warmup: (
        calls.append((repeats, device, warmup)), fn(), [0.3, 0.2, 0.4])[-1])
    result = tool.measure('ConvNeur-M3 local-only', (64, 96), 'cpu', 3)
    assert calls == [(3, 'cpu', 1)]
    assert result['name'] == 'ConvNeur-M3 local-only' and result['size'] == [64, 96]
    assert result['seconds'] == 0.2 and result['peak_mb'] >= 0


def test_op_counter_sums_each_kernels_arguments_and_results_in_bytes():
    from convneur_mm.testing.dispatch_probes import AtenOpCounter
    a, b = torch.randn(3, 4), torch.randn(4, 5, dtype=torch.float64)
    with AtenOpCounter() as counter:
        a.t()  # a view: no bytes
        a.mm(b.float())  # a cast (4x5 float64 in, float32 out), then a product
        a.mul_(2)  # in place: read and written
    assert counter.bytes == {'_to_copy': 20 * 8 + 20 * 4, 'mm': (12 + 20 + 15) * 4,
                             'mul_': 2 * 12 * 4}
    assert counter.total_bytes == sum(counter.bytes.values()) and counter.num_views == 1


def test_count_ops_on_meta_tensors_equals_the_cpu_count():
    """``--device meta`` (no data: a batch of 128 in seconds) dispatches the
    same ops with the same shapes as the CPU."""
    count = import_analysis_tool('count_ops').count
    on_cpu, on_meta = (count('m1', 0, 64, 2, device) for device in ('cpu', 'meta'))
    assert on_meta == on_cpu
    inference = on_meta['inference']
    assert inference['bytes'] == sum(inference['bytes_by_op'].values()) > 0
    assert set(inference['bytes_by_op']) <= set(inference['by_op'])


def test_count_ops_counts_the_fused_kernels_allocations_on_meta_tensors():
    """``--kernels triton`` on meta: the wrappers allocate, nothing launches;
    the fused path holds less than the PyTorch path and has no autograd."""
    count = import_analysis_tool('count_ops').count
    cfg = dict(matmul_dtype='bfloat16')
    fused = count('m1', 0, 64, 2, 'meta', dict(cfg, kernels='triton'))
    eager = count('m1', 0, 64, 2, 'meta', dict(cfg, kernels='torch'))
    assert set(fused) == {'inference'}
    assert 0 < fused['inference']['peak_live_bytes'] < eager['inference']['peak_live_bytes']
    assert fused['inference']['kernels'] < eager['inference']['kernels']


def test_count_ops_counts_the_backbone_with_and_without_global_branches():
    count = import_analysis_tool('count_ops').count
    backbone, local = (count('m1', 0, 64, 2, 'meta', part=part)['inference']
                       for part in ('backbone', 'local-only'))
    branch = count('m1', 0, 64, 2, 'meta')['inference']
    assert local['peak_live_bytes'] < backbone['peak_live_bytes']
    assert local['kernels'] + branch['kernels'] < backbone['kernels']


def test_memory_benchmark_counts_the_same_matrix_products_on_both_paths():
    """The speed-up bound printed by benchmark_memory rests on this: the
    closed-form path and the autograd reference run the same GEMM FLOPs."""
    import torch

    from convneur_mm.models.layers.neural_memory import NeuralMemory
    from convneur_mm.testing.memory_reference import reference_memory
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
    assert ('ConvNeur-M3', '9.0', '10.0', '12.0', '1.11x', '1.33x', '0.50%',
            '40') in table_rows(text)


def test_speed_report_says_where_the_eager_gap_goes():
    bench = import_analysis_tool('benchmark_speed')
    common = dict(params=1e7, latency_ms=50.0, peak_mb=100, mode='eager')
    results = [
        dict(name='ConvNeur-M3 local-only', paper_macs=1.4e9, full_macs=1.4e9, throughput=20.0,
             branch_time_share=None, branch_mac_share=None, **common),
        dict(name='ConvNeur-M3', paper_macs=1.8e9, full_macs=3.5e9, throughput=8.0,
             branch_time_share=0.6, branch_mac_share=0.6, branch_gemm_s_per_image=0.0625,
             branch_profiled_s_per_image=0.08, **common)]
    text = bench.report(results, 'test device', 16, gemm_rate=84e9)
    # 4.2 GFLOP in 62.5 ms: 67 GFLOP/s; 1 / (1/20 + 0.0625) = 8.89 img/s
    assert ('take 62.5 ms per image at their own shapes (67 GFLOP/s against the 2048^3 '
            "product's 84), everything else in them 17.5 ms") in text
    assert 'ConvNeur-M3 <= 8.9 img/s: measured / that = 0.90.' in text


def test_global_branch_times_profile_the_branches_alone(monkeypatch):
    """One profiled call of the global branches only (no local branch runs
    in it), on the inputs the timed forward recorded, their products counted
    with the 1x1 projections' convolutions."""
    from convneur_mm.models.backbones.convneur import ConvNeur
    from convneur_mm.models.layers.global_branch import GlobalBranch
    from convneur_mm.models.layers.local_branch import LocalBranch
    from convneur_mm.analysis import op_profile
    bench = import_analysis_tool('benchmark_speed')
    model = ConvNeur(arch='m1', out_indices=(3,)).eval()
    local_calls = []
    for m in model.modules():
        if isinstance(m, LocalBranch):
            m.register_forward_hook(lambda *args: local_calls.append(1))
    with torch.no_grad():
        _, inputs = bench._global_branch_seconds(model, model, torch.randn(1, 3, 64, 64), 'cpu')
        assert [m for m, _ in inputs] == [m for m in model.modules() if isinstance(m, GlobalBranch)]
        assert [tuple(t.shape[2:]) for _, t in inputs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
        assert local_calls  # the timed forward ran the whole network
        local_calls.clear()
        products, total = bench._global_branch_times(inputs, 'cpu')
    assert 0 < products < total
    assert not local_calls

    def fake_profile(call, device):
        call()
        return {op_profile.MATRIX_PRODUCTS: 2.0, op_profile.CONVOLUTIONS: 1.0, 'rest': 0.5}
    monkeypatch.setattr(op_profile, 'profile_call', fake_profile)
    with torch.no_grad():
        assert bench._global_branch_times(inputs, 'cpu') == (3.0, 3.5)


def test_global_branch_timer_records_events_on_the_benchmark_device(monkeypatch):
    """On CUDA the branches are timed by events on the device's stream, read
    after a synchronize of that device (here cuda:1, stubbed)."""
    from convneur_mm.models.layers.global_branch import GlobalBranch
    from tests.test_analysis.test_bench_env import _FakeCuda
    bench = import_analysis_tool('benchmark_speed')
    model = torch.nn.Sequential(GlobalBranch(8, 8, chunk_size=4), GlobalBranch(8, 8, chunk_size=4))
    cuda = _FakeCuda(monkeypatch, [0.0, 1.0, 5.0, 5.25])  # two branches: 1 s and 0.25 s
    with torch.no_grad():
        seconds, inputs = bench._global_branch_seconds(model, model, torch.randn(1, 8, 4, 4),
                                                       'cuda:1')
    assert seconds == pytest.approx(1.25) and [m for m, _ in inputs] == list(model)
    second = torch.device('cuda:1')
    assert cuda.calls == [('record', ('stream', second))] * 4 + [('synchronize', second)]
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # removed


def test_memory_benchmark_skips_titans_with_a_message_when_absent(monkeypatch):
    import sys
    bench = import_analysis_tool('benchmark_memory')
    monkeypatch.setitem(sys.modules, 'titans_pytorch', None)  # import fails
    module, message = bench.titans_memory(16, 4)
    assert module is None and 'requirements/optional/titans.txt' in message


def test_memory_benchmark_reports_titans_eager_and_both_compiled():
    bench = import_analysis_tool('benchmark_memory')
    name = 'titans-pytorch 0.5.5'
    ours, ours_c = 'ours (closed form, scan)', 'ours, torch.compile'
    titans_c = name + ', torch.compile'
    train = {ours: 0.7, name: 1.4, ours_c: 0.5, titans_c: 0.6}
    infer = {ours: 0.2, name: 0.3, ours_c: 0.1, titans_c: 0.25}
    lines = bench.titans_report(name, {'ours': 80e9, 'titans': 100e9}, train, infer)
    assert lines == [
        f'vs {name}: ours 2.00x faster forward+backward (target >= 2x), 1.50x inference',
        f'{name} runs 1.25x our matrix-product FLOPs (forward+backward)',
        'both compiled: ours 1.20x faster forward+backward, 2.50x inference']
    eager_only = {k: v for k, v in train.items() if 'compile' not in k}
    assert len(bench.titans_report(name, {'ours': 1, 'titans': 1}, eager_only, infer)) == 2


def test_compile_breakdown_table_gives_seconds_and_shares():
    bench = import_analysis_tool('benchmark_compile')
    seconds = {'convolutions': 3.0, 'matrix products': 2.0, 'other': 2.0}
    table = bench.breakdown_table('train', seconds, dict(seconds, convolutions=1.0))
    assert ('convolutions', '3.000 s (43%)', '1.000 s (20%)', '-2.000 s') in table_rows(table)
