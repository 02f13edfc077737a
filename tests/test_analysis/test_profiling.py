"""SavedTensorMeter: activation memory on any device."""
import torch
from torch import nn

from convneur_mm.analysis.profiling import SavedTensorMeter


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

