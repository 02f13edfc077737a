"""SavedTensorMeter (activation memory on any device) and the with_cp benchmark."""
import torch
from torch import nn

from convneur_mm.analysis.profiling import SavedTensorMeter
from tests.paths import import_analysis_tool


def test_meter_counts_unique_saved_storages_without_parameters():
    linear = nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256, requires_grad=True)
    with SavedTensorMeter(exclude=linear.parameters(), scopes={'linear': linear}) as meter:
        hidden = linear(x)  # saves x (and the weight: excluded)
        out = (hidden.sin() * hidden[:, :1]).sum()  # saves hidden, once, and a view of it
    assert meter.total_bytes == 2 * 64 * 256 * 4 + 64 * 256 * 4  # x, hidden, sin's product
    assert meter.by_scope == {'linear': 64 * 256 * 4}
    out.backward()
    assert x.grad is not None  # the hooks pass tensors through unchanged


def test_benchmark_with_cp_prints_the_table(capsys):
    benchmark_with_cp = import_analysis_tool('benchmark_with_cp')
    threads = torch.get_num_threads()
    try:
        rows = benchmark_with_cp.main(['--arch', 'm1', '--batch', '1', '--size', '64', '64',
                                       '--repeats', '1', '--chunk-size', '64', '--threads', '1'])
    finally:
        torch.set_num_threads(threads)
    assert rows[True]['saved'] < rows[False]['saved']
    assert 0 < rows[False]['largest_block'] < rows[False]['saved']
    out = capsys.readouterr().out
    assert '| with_cp |' in out and '| False |' in out and '| True |' in out
    assert 'with_cp keeps' in out
