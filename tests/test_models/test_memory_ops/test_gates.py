"""The gates: the Triton kernel (in the interpreter) and PyTorch against the
naive form in float64, their layouts, and bad arguments."""
import pytest
import torch

from convneur_mm.models.layers.memory_ops.gates import (GateWeights, chunk_gates,
                                                        chunk_gates_naive, chunk_gates_torch,
                                                        chunk_gates_triton)

from .memory_cases import F32_TOL, GATES_CASES, _gate_args, gates_errors


@pytest.mark.parametrize('case', list(GATES_CASES))
def test_triton_gates_match_float64_forward_and_backward(forward_runs, case):
    result = forward_runs[f'gates_{case}']
    b, u, _, heads = GATES_CASES[case]
    assert result['shapes'] == [[heads, b, u], [heads, b, u], [3, heads, b, u]]
    assert result['contiguous']
    assert max(result['forward']) < F32_TOL, result
    assert max(result['backward']) < F32_TOL, result


def test_triton_gates_hold_logits_where_one_minus_sigmoid_rounds_to_zero(forward_runs):
    """log(1 - sigmoid(40)) is -40, not log(0); log(sigmoid(40)) keeps its -4e-18."""
    assert forward_runs['gates_extreme_logits']['elementwise'] < 1e-6


@pytest.mark.parametrize('heads,d', [(1, 16), (2, 24)])
def test_pytorch_gates_match_float64(heads, d):
    gen = torch.Generator().manual_seed(heads)
    summary = torch.randn(3, 5, d, generator=gen)
    weights = _gate_args(heads, d, gen)
    got = chunk_gates(summary, weights, implementation='torch')
    exact = chunk_gates_naive(summary.double(), GateWeights(*(t.double() for t in weights)))
    for a, e in zip(got, exact):
        assert a.is_contiguous() and a.shape == e.shape
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < F32_TOL


def test_gates_refuse_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    weights = _gate_args(2, 16, gen)
    summary = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=r'summary must be \(B, U, d\)'):
        chunk_gates_torch(summary[0], weights)
    with pytest.raises(ValueError, match=r'weights.momentum must be \(2, 16\)'):
        chunk_gates_torch(summary, weights._replace(momentum=torch.zeros(2, 8)))
    for rows in (5, 0):
        with pytest.raises(ValueError, match='not a positive multiple of the 2 heads'):
            chunk_gates_torch(summary, weights._replace(lr_modulation=torch.zeros(rows, 16),
                                                        lr_modulation_bias=torch.zeros(rows)))
    with pytest.raises(ValueError, match='at least one head'):
        chunk_gates_torch(summary, weights._replace(decay=torch.zeros(0, 16)))
    with pytest.raises(TypeError, match='summary is torch.float64'):
        chunk_gates_triton(summary.double(), weights)
    with pytest.raises(ValueError, match=r"chunk_gates has the implementations \('torch', "
                                         r"'triton'\), got 'cuda'"):
        chunk_gates(summary, weights, implementation='cuda')


@pytest.mark.gpu
@pytest.mark.parametrize('d,heads', [(128, 1), (160, 4)])
def test_triton_gates_on_cuda(d, heads):
    """The compiled gates kernel at M3's and M4's widths, a batch of 128
    images' 15 written chunks, forward and backward against the stable form
    in float64; one image's summaries scaled to logits of tens, past
    float32's 1 + exp(-|z|), where the GPU's fast exp meets log(1 - sigmoid)
    near 0 and -|z| (at a hundred, the weights' float32 gradient sums lose
    digits to their largest terms: 9e-6 of 1e-5 in the interpreter)."""
    gen = torch.Generator().manual_seed(d)
    summary = torch.randn(128, 15, d, generator=gen)
    summary[0] *= 10.0
    errors = gates_errors(summary, _gate_args(heads, d, gen), gen, 'cuda',
                          reference=chunk_gates_torch)
    assert max(errors['forward'] + errors['backward']) < F32_TOL, errors
