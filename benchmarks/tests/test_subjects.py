"""The memory benchmark's shared helpers (CPU)."""
import pytest
import torch

from benchmarks.common import subjects as mv


def test_free_survives_a_cuda_context_broken_by_a_kernel_fault(monkeypatch):
    """After an illegal memory access every CUDA call fails: releasing the
    cache between measurements must not lose the rows measured so far."""
    def broken():
        raise RuntimeError('CUDA error: an illegal memory access was encountered')

    monkeypatch.setattr(torch.cuda, 'empty_cache', broken)
    mv.free('cuda')  # no error: the next measurement records it
    mv.free('cpu')
    with pytest.raises(RuntimeError, match='illegal memory access'):
        torch.cuda.empty_cache()
