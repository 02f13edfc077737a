"""The bidirectional WKV's prefix-sum form against RWKV's step-by-step
recurrence in both directions (float64) and against the O(N^2) definition;
lengths to 8192 tokens, far beyond the reference CUDA kernel's 1024; float32
under bf16 autocast."""
import pytest
import torch

from convneur_mm.models.layers.mixers.wkv import bi_wkv
from ...mixer_reference import bi_wkv as bi_wkv_definition
from ...mixer_reference import bi_wkv_recurrence


def _inputs(b, n, c, key_scale=1.0, decay_scale=3.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, n, c, generator=gen, dtype=dtype) * key_scale
    v = torch.randn(b, n, c, generator=gen, dtype=dtype)
    decay = torch.randn(c, generator=gen, dtype=dtype) * decay_scale
    first = torch.randn(c, generator=gen, dtype=dtype) * decay_scale
    return decay, first, k, v


def test_matches_the_definition_on_a_short_sequence():
    decay, first, k, v = _inputs(2, 9, 3, dtype=torch.float64)
    torch.testing.assert_close(bi_wkv(decay, first, k, v),
                               bi_wkv_definition(decay, first, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('b,n,c,key_scale,decay_scale', [
    (2, 64, 5, 1.0, 3.0),
    (1, 300, 4, 10.0, 8.0),
    (1, 200, 3, 30.0, 5.0),  # keys up to ~100: e^k overflows float32 without the max shift
    (1, 8192, 2, 2.0, 20.0),  # 8x the reference kernel's 1024-token limit
])
def test_float32_matches_the_float64_recurrence(b, n, c, key_scale, decay_scale):
    decay, first, k, v = _inputs(b, n, c, key_scale, decay_scale)
    out = bi_wkv(decay, first, k, v)
    assert out.dtype == torch.float32
    expected = bi_wkv_recurrence(decay, first, k, v)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_runs_in_float32_under_bf16_autocast():
    decay, first, k, v = _inputs(2, 200, 8)
    k16, v16 = k.bfloat16(), v.bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = bi_wkv(decay, first, k16, v16)
    assert out.dtype == torch.bfloat16
    expected = bi_wkv(decay, first, k16.float(), v16.float())
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_gradients_match_finite_differences():
    decay, first, k, v = (t.requires_grad_() for t in _inputs(1, 6, 2, dtype=torch.float64))
    assert torch.autograd.gradcheck(bi_wkv, (decay, first, k, v))


def test_refuses_mismatched_shapes():
    decay, first, k, v = _inputs(1, 6, 2)
    with pytest.raises(ValueError, match=r'k and v must both be \(B, N, C\)'):
        bi_wkv(decay, first, k, v[:, :5])
