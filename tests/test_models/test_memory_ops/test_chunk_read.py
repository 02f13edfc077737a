"""The chunk read (chunk t reads state t, heads merged): its kernels and reference."""
import pytest
import torch

from convneur_mm.models.layers.memory_ops import (chunk_read_naive, chunk_read_torch, read_naive,
                                                  read_torch)

from .memory_cases import F16_TOL, F32_TOL, _op_weights


def test_triton_chunk_read_merges_heads(forward_runs):
    assert forward_runs['read_chunks_f32']['shapes'] == [[2, 40, 32]]
    assert forward_runs['read_chunks_f32']['exact'] < F32_TOL
    assert forward_runs['read_chunks_f16']['exact'] < F16_TOL


def test_chunk_read_backward_writes_the_queries_gradient_merged(backward_runs):
    # the gradient lands in the (B, N, H * d) layout the projections made the
    # queries in: it flows back without a copy
    assert backward_runs['chunk_read_f32']['queries_grad_merged']
    assert set(backward_runs['chunk_read_decomposed_f32']['grads']) == {
        'w1', 'w2', 'g', 'base_w1', 'base_w2', 'carry', 'queries'}


@pytest.mark.parametrize('decomposed', ['', '_decomposed'])
@pytest.mark.parametrize('layout', ['', '_one_program'])
def test_chunk_read_trains_on_16_bit_states(backward_runs, layout, decomposed):
    """w1's and w2's states in float16 (bfloat16 training's): their
    gradients come in float16, within its tolerance of float64 reading the
    same states, both passes and one program per state; a decomposed read's
    W_0 and a_t gradients too (summed from the float32 ones)."""
    result = backward_runs[f'chunk_read{layout}{decomposed}_f16_states']
    assert result['grad_dtypes'] == ['torch.float16', 'torch.float16']
    assert len(result['grads']) == (7 if decomposed else 4)
    assert result['forward'] < F16_TOL
    assert max(result['grads'].values()) < F16_TOL, result['grads']


@pytest.mark.parametrize('decomposed', [False, True])
def test_chunk_read_matches_its_reference(decomposed):
    """Token n reads state n // L (a partial last chunk), heads merged; the
    decomposed read (dW with W_0 and a_t) equals the read of a_t W_0 + dW."""
    gen = torch.Generator().manual_seed(1)
    heads, batch, chunks, length, n, d = 2, 3, 3, 4, 10, 6
    states = _op_weights(heads * batch * chunks, d, gen).map(
        lambda t: t.view(heads, batch, chunks, *t.shape[1:]))
    queries = torch.randn(heads, batch, n, d, generator=gen).double()
    base = carry = None
    if decomposed:
        base = _op_weights(heads, d, gen)
        carry = torch.rand(heads, batch, chunks, generator=gen).double()
    got = chunk_read_torch(states, queries, length, None, base, carry)
    assert got.shape == (batch, n, heads * d)
    torch.testing.assert_close(got, chunk_read_naive(states, queries, length, base, carry))
    if decomposed:  # read_torch's decomposed products against the whole state's
        x = queries.reshape(heads * batch, n, d)
        delta = states.map(lambda t: t[:, :, 0].reshape(heads * batch, *t.shape[3:]))
        a = carry[:, :, 0].reshape(-1)
        torch.testing.assert_close(read_torch(delta, x, None, base, a),
                                   read_naive(delta, x, base, a))
