"""Backbone time and memory against resolution: the exponent fit and one measurement."""
from benchmarks.paper import resolution as tool


def test_scaling_exponent_needs_sizes_that_differ():
    fit = tool.fit_exponent
    assert fit([(1024 * 1024, 1.0)]) is None
    assert fit([(1024 * 1024, 1.78), (800 * 1333, 2.07)]) is None  # 2% apart: noise
    assert abs(fit([(512 ** 2, 0.5), (1024 ** 2, 2.0), (2048 ** 2, 8.0)]) - 1.0) < 1e-9
    assert abs(fit([(512 ** 2, 1.0), (1024 ** 2, 16.0)]) - 2.0) < 1e-9


def test_resolution_measure_reports_the_fastest_timed_forward(monkeypatch):
    """One forward warms up and is not timed; the fastest timed one counts."""
    calls = []
    monkeypatch.setattr(tool, 'time_calls', lambda fn, repeats, device, warmup: (
        calls.append((repeats, device, warmup)), fn(), [0.3, 0.2, 0.4])[-1])
    result = tool.measure('ConvNeur-M3 local-only', (64, 96), 'cpu', 3)
    assert calls == [(3, 'cpu', 1)]
    assert result['name'] == 'ConvNeur-M3 local-only' and result['size'] == [64, 96]
    assert result['seconds'] == 0.2 and result['peak_mb'] >= 0
