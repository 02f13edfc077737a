"""Inductor's own byte count of compiled code (``InductorByteCounter``)."""
import pytest
import torch

from benchmarks.memory.inductor_bytes import InductorByteCounter
from convneur_mm.testing.dispatch_probes import AtenOpCounter


def _chain(x: torch.Tensor) -> torch.Tensor:
    return (x * 2.0 + 1.0).relu()


def test_a_fused_chain_reads_its_input_and_writes_its_output_once():
    x = torch.randn(4096)
    with AtenOpCounter() as eager:
        _chain(x)
    assert eager.total_bytes == 3 * 2 * x.nbytes  # three kernels, each reads and writes
    for _ in range(2):  # the second compile is counted too (no cached graph)
        with InductorByteCounter() as counter:
            torch.compile(_chain)(x)
        assert counter.total_bytes == 2 * x.nbytes


def test_a_training_step_counts_the_backward_graph_too():
    x = torch.randn(4096, requires_grad=True)
    with InductorByteCounter() as forward:
        torch.compile(torch.sin)(x.detach())
    with InductorByteCounter() as step:
        torch.compile(torch.sin)(x).sum().backward()
    assert step.total_bytes > forward.total_bytes


def test_nothing_compiled_is_an_error_not_zero_bytes():
    with pytest.raises(RuntimeError, match='counted no bytes'):
        with InductorByteCounter():
            _chain(torch.randn(8))
