"""The benchmarks' device helpers: the GEMM-rate yardstick, and CUDA timing
and memory readings on the device asked for (checked with a stub of
torch.cuda, since no GPU is available to the test suite)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from convneur_mm.analysis import timing
from convneur_mm.analysis.timing import (RegionTimer, peak_gemm_rate, peak_memory_bytes,
                                         reset_peak_memory, synchronize)


def _fake_clock(monkeypatch, durations):
    """perf_counter() as a clock under which the i-th timed call lasts durations[i]."""
    stamps, now = [], 100.0
    for duration in durations:
        stamps += [now, now + duration]
        now += duration + 1.0
    monkeypatch.setattr(timing.time, 'perf_counter', lambda: stamps.pop(0))
    return stamps


def test_peak_gemm_rate_is_two_flops_per_multiply_add_of_the_best_product(monkeypatch):
    # an untimed warm-up, then 3 timed products; the second is the fastest (0.25 s)
    stamps = _fake_clock(monkeypatch, [1.0, 0.25, 0.5])
    rate = peak_gemm_rate('cpu', size=64, repeats=3)
    assert not stamps  # every timed product read the clock twice, the warm-up never
    assert rate == pytest.approx(2 * 64 ** 3 / 0.25, rel=1e-12)


def test_time_calls_waits_for_the_device_and_times_only_after_the_warm_up(monkeypatch):
    """The one timer of the tools: the device is synchronized before the clock
    starts and before it stops (kernels run after a CUDA call returns)."""
    cuda = _FakeCuda(monkeypatch, [])
    clock = _fake_clock(monkeypatch, [2.0, 0.5])
    done = []

    def work():
        done.append(len(cuda.calls))
    seconds = timing.time_calls(work, 2, 'cuda:1', warmup=1)
    assert seconds == pytest.approx([2.0, 0.5]) and not clock
    second = torch.device('cuda:1')
    # warm-up without syncs; then sync, work, sync for each timed call
    assert done == [0, 1, 3] and cuda.calls == [('synchronize', second)] * 4
    assert timing.median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match='repeats must be at least 1'):
        timing.time_calls(work, 0)


def test_relative_spread_is_the_interquartile_range_over_the_median():
    """One stall among twenty turns leaves the spread where the other turns
    put it; a drift that moves half the turns shows."""
    steady = [1.0, 1.02, 0.98, 1.01, 0.99] * 4
    assert timing.relative_spread(steady) == pytest.approx(0.02)
    assert timing.relative_spread(steady[:-1] + [5.0]) < 0.025  # its range: 400%
    assert timing.relative_spread([1.0] * 10 + [2.0] * 10) == pytest.approx(0.5)
    assert timing.relative_spread([0.3]) == 0.0
    with pytest.raises(ValueError, match='spread of no values'):
        timing.relative_spread([])


def test_time_in_turns_alternates_the_functions_after_untimed_turns(monkeypatch):
    """Compared work takes turns (a b a b), warm-up turns untimed, a pause
    before each timed turn: what every benchmark that compares variants uses."""
    clock = _fake_clock(monkeypatch, [1.0, 2.0, 3.0, 4.0])
    calls = []
    fns = {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}
    times = timing.time_in_turns(fns, 2, warmup=1, before_round=lambda: calls.append('|'))
    assert times['a'] == pytest.approx([1.0, 3.0]) and times['b'] == pytest.approx([2.0, 4.0])
    assert not clock
    assert calls == ['a', 'b', '|', 'a', 'b', '|', 'a', 'b']
    with pytest.raises(ValueError, match='rounds must be at least 1'):
        timing.time_in_turns(fns, 0)


def test_peak_gemm_rate_is_a_plausible_rate_in_real_time():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    a @ b
    start = time.perf_counter()
    a @ b
    one_product = 2 * 256 ** 3 / (time.perf_counter() - start)
    rate = peak_gemm_rate('cpu', size=256, repeats=20)
    assert 1e8 < rate < 1e15  # FLOP/s, not seconds
    assert rate > 0.5 * one_product


class _FakeCuda:
    """Records what the helpers ask of torch.cuda, and with which device."""

    def __init__(self, monkeypatch, clock):
        self.calls, self.clock = [], list(clock)
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.stamp = None

            def record(self, stream=None):
                fake.calls.append(('record', stream))
                self.stamp = fake.clock.pop(0)

            def elapsed_time(self, end):  # milliseconds, as CUDA events give them
                assert fake.calls[-1][0] == 'synchronize', 'events read before a sync'
                return (end.stamp - self.stamp) * 1e3

        def recorder(name, result=None):
            def call(device=None):
                fake.calls.append((name, device))
                return result
            return call

        monkeypatch.setattr(torch.cuda, 'Event', Event)
        monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: ('stream', device))
        monkeypatch.setattr(torch.cuda, 'synchronize', recorder('synchronize'))
        monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats', recorder('reset'))
        monkeypatch.setattr(torch.cuda, 'max_memory_allocated', recorder('peak', 123))


def test_cuda_helpers_act_on_the_device_asked_for(monkeypatch):
    cuda = _FakeCuda(monkeypatch, [])
    second = torch.device('cuda:1')
    synchronize('cuda:1')
    reset_peak_memory('cuda:1')
    assert peak_memory_bytes('cuda:1') == 123
    assert cuda.calls == [('synchronize', second), ('reset', second), ('peak', second)]
    synchronize('cpu')
    reset_peak_memory('cpu')
    assert len(cuda.calls) == 3  # no CUDA call for the CPU


def test_cuda_benchmarks_time_convolutions_and_products_in_the_same_precision(monkeypatch):
    """torch's defaults: cuDNN convolutions in TF32, matrix products not."""
    from convneur_mm.analysis.timing import setup_benchmark_device
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: f'GPU {device}')
    current = []
    monkeypatch.setattr(torch.cuda, 'set_device', current.append)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        description = setup_benchmark_device('cuda:1')
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert description == 'GPU cuda:1, TF32 off (convolutions and matrix products)'
    assert current == [torch.device('cuda:1')]  # graphs, streams and do_bench follow it


def test_region_timer_times_cuda_kernels_with_events_on_the_device(monkeypatch):
    # event stamps in seconds: region a lasts 2 s, region b 0.5 s
    cuda = _FakeCuda(monkeypatch, [10.0, 12.0, 20.0, 20.5])
    timer = RegionTimer('cuda:1')
    for key in ('a', 'b'):
        timer.start(key)
        timer.stop(key)
    assert timer.seconds() == pytest.approx(2.5)
    second = torch.device('cuda:1')
    assert cuda.calls == [('record', ('stream', second))] * 4 + [('synchronize', second)]


def test_region_timer_uses_the_host_clock_on_cpu(monkeypatch):
    _fake_clock(monkeypatch, [3.0, 0.5])
    timer = RegionTimer('cpu')
    for key in ('a', 'b'):
        timer.start(key)
        timer.stop(key)
    assert timer.seconds() == pytest.approx(3.5)


def test_peak_memory_growth_on_cuda_excludes_what_was_allocated_before(monkeypatch):
    """Weights and inputs allocated before the window are not its peak: 123
    bytes at the peak, 23 already there when it opened."""
    cuda = _FakeCuda(monkeypatch, [])
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: 23)
    window = timing.PeakMemoryGrowth('cuda:1')
    assert window.mib() == pytest.approx(100 / 2**20)
    assert ('reset', torch.device('cuda:1')) in cuda.calls


GROWTH = """
import torch
from convneur_mm.analysis.timing import PeakMemoryGrowth
earlier = torch.ones(384 * 2**20 // 4)  # an earlier, larger peak ...
del earlier  # ... whose memory malloc keeps, under raised thresholds
window = PeakMemoryGrowth('cpu')
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
print(window.mib())
"""


# raised thresholds are a `slow` case: the same measurement under tools' settings
@pytest.mark.parametrize('thresholds', [None, pytest.param(str(1 << 30), marks=pytest.mark.slow)],
                         ids=['glibc-defaults', 'raised'])
def test_peak_memory_growth_on_cpu_is_what_the_work_added(thresholds):
    """In a fresh process, after a larger earlier peak, and with the malloc
    thresholds that ``cpu_malloc`` exports to children (as in the test suite,
    where the old high-water-mark reading saw 0 MiB: the freed earlier block
    was reused and the peak was already higher)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    if thresholds:
        env.update(MALLOC_MMAP_THRESHOLD_=thresholds, MALLOC_TRIM_THRESHOLD_=thresholds)
    out = subprocess.run([sys.executable, '-c', GROWTH], capture_output=True, text=True,
                         check=True, timeout=120, env=env)
    grown = float(out.stdout.split()[-1])
    assert 256 - 32 <= grown <= 256 + 32, grown  # the process's own RSS is not counted
