"""ConvNeur's speed against its peers: the best round, the GEMM-rate bound,
the global branches' time."""
import pytest
import torch

from convneur_mm.analysis import speed as bench
from ..markdown import table_rows


def test_best_round_takes_best_speed_and_largest_peak():
    rounds = [dict(name='M3', throughput=9.0, latency_ms=80.0, peak_mb=900, branch_time_share=0.5),
              dict(name='M3', throughput=11.0, latency_ms=95.0, peak_mb=850, branch_time_share=0.4),
              dict(name='M3', throughput=10.0, latency_ms=85.0, peak_mb=870, branch_time_share=0.6)]
    best = bench.best_round(rounds)
    assert best['throughput'] == 11.0 and best['branch_time_share'] == 0.4  # one round's
    assert best['latency_ms'] == 80.0 and best['peak_mb'] == 900 and best['rounds'] == 3
    assert rounds[1]['latency_ms'] == 95.0  # inputs untouched


def test_speed_report_bounds_m3_by_its_branches_gemms():
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


def test_speed_report_bounds_float32_only_and_compares_the_modes():

    def row(name, mode, throughput, **extra):
        branches = name == 'ConvNeur-M3'
        return dict(name=name, mode=mode, params=1e7, latency_ms=50.0, peak_mb=100,
                    paper_macs=1.8e9 if branches else 1.4e9,
                    full_macs=3.5e9 if branches else 1.4e9, throughput=throughput,
                    branch_time_share=0.5 if branches and mode == 'eager' else None,
                    branch_mac_share=0.6 if branches else None, warm_up_s=40.0, **extra)
    results = [row('ConvNeur-M3 local-only', 'eager', 20.0), row('ConvNeur-M3', 'eager', 9.0),
               row('ConvNeur-M3 local-only', 'bf16', 25.0, relative_error=0.004),
               row('ConvNeur-M3', 'bf16', 12.0, relative_error=0.005)]
    text = bench.report(results, 'test device', 16, gemm_rate=84e9)
    # eager: 1 / (1/20 + 4.2e9/84e9) = 10 img/s
    assert 'ConvNeur-M3 measured / bound (eager): 9.0 / 10.0 = 0.90' in text
    assert 'bound (bf16)' not in text  # a float32 bound says nothing about bf16
    assert ('ConvNeur-M3', '9.0', '12.0', '1.33x', '0.50%') in table_rows(text)
    assert ('ConvNeur-M3 local-only', '20.0', '25.0', '1.25x', '0.40%') in table_rows(text)


def test_speed_report_says_where_the_eager_gap_goes():
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
    from tests.test_analysis.test_timing import _FakeCuda
    model = torch.nn.Sequential(GlobalBranch(8, 8, chunk_size=4), GlobalBranch(8, 8, chunk_size=4))
    cuda = _FakeCuda(monkeypatch, [0.0, 1.0, 5.0, 5.25])  # two branches: 1 s and 0.25 s
    with torch.no_grad():
        seconds, inputs = bench._global_branch_seconds(model, model, torch.randn(1, 8, 4, 4),
                                                       'cuda:1')
    assert seconds == pytest.approx(1.25) and [m for m, _ in inputs] == list(model)
    second = torch.device('cuda:1')
    assert cuda.calls == [('record', ('stream', second))] * 4 + [('synchronize', second)]
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # removed
