"""The scan: the momentum/decay recursion, its matrix products and its Triton kernel."""
import pytest
import torch

from convneur_mm.models.layers.memory_ops import momentum_decay_states, scan_states_naive

from .memory_cases import F32_TOL


def test_triton_scan_matches_the_recursion(forward_runs):
    """Step by step in float32 within 1e-5 of float64; 16-bit states are the
    float32 states cast (the read would round them the same way); the
    backward kernel gives every input's gradient within 1e-5 of float64."""
    backward = forward_runs['scan_backward']
    assert backward['count'] == 8 and backward['exact'] < F32_TOL, backward
    assert forward_runs['scan_backward_small_updates']['exact'] < F32_TOL
    result = forward_runs['scan']
    assert result['exact'] < F32_TOL, result
    assert result['shapes'] == [[3, 6, 40], [3, 6, 1100], [3, 6, 7]]
    assert result['dtypes'] == ['torch.float16', 'torch.float16', 'torch.float32']
    assert result['cast_difference'] == 0


def test_triton_scan_trains_with_16_bit_gradients_and_states(forward_runs):
    """bfloat16 training's dtypes (float16 here): two gradients and their
    states 16-bit; each gradient comes in its input's dtype, within 1e-3 of
    float64 at the same rounded gradients and cotangents (the gates' from
    the rounded states and momenta)."""
    result = forward_runs['scan_backward_16_bit']
    assert result['dtypes'] == ['torch.float16'] * 2 + ['torch.float32'] * 6
    assert max(result['exact']) < 1e-3, result


# block None: all steps in one block (the shape-generic graph for export)
@pytest.mark.parametrize('steps,block', [(1, 64), (7, 3), (16, 64), (130, 64), (9, 4),
                                         (1, None), (130, None)])
def test_momentum_decay_states_match_the_recursion(steps, block):
    gen = torch.Generator().manual_seed(steps)
    args = (torch.randn(3, steps, 5, generator=gen).double(),
            torch.rand(3, steps, generator=gen).double(),
            torch.nn.functional.logsigmoid(torch.randn(3, steps, generator=gen)).double(),
            torch.nn.functional.logsigmoid(torch.randn(3, steps, generator=gen)).double(),
            torch.randn(3, 5, generator=gen).double())
    fast = momentum_decay_states(*args, block_size=block)
    grads, lr_mod, log_keep, log_momentum, initial = args
    naive = scan_states_naive([grads], lr_mod[None], log_keep, log_momentum, [initial])[0]
    torch.testing.assert_close(fast, naive)


def test_momentum_decay_states_are_differentiable_in_every_input():
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 6, 3, generator=gen).double(), torch.rand(2, 6, generator=gen).double(),
            -torch.rand(2, 6, generator=gen).double(), -torch.rand(2, 6, generator=gen).double(),
            torch.randn(2, 3, generator=gen).double()]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(
        lambda *a: momentum_decay_states(*a, block_size=4), args)


def test_momentum_decay_states_survive_tiny_decays():
    # exp(cumsum) underflows over long sequences; the masked form must not NaN
    steps = 300
    out = momentum_decay_states(torch.ones(1, steps, 2), torch.ones(1, steps),
                                torch.full((1, steps), -50.0), torch.full((1, steps), -50.0),
                                torch.ones(1, 2))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, -1], -torch.ones(2), rtol=0, atol=1e-6)


def test_triton_scan_refuses_bad_arguments_and_allocates_its_states_only():
    from convneur_mm.models.layers.memory_ops import kernels
    from convneur_mm.models.layers.memory_ops.scan import scan_states_triton
    from convneur_mm.testing.dispatch_probes import LiveTensorBytes
    n, u, p = 4, 5, 64
    grads, gates = torch.zeros(n, u, p), torch.zeros(n, u)
    with pytest.raises(ValueError, match='as many'):
        scan_states_triton([grads], torch.zeros(2, n, u), gates, gates, [None])
    with pytest.raises(ValueError, match=r'grads\[0\] must be \(4, 5, P\)'):
        scan_states_triton([grads[:, :3]], gates[None], gates, gates, [None])
    with pytest.raises(TypeError, match='float32 grads'):
        scan_states_triton([grads.double()], gates[None], gates, gates, [None])
    with pytest.raises(ValueError, match='state dtypes'):
        scan_states_triton([grads], gates[None], gates, gates, [None], state_dtypes=[torch.int8])
    with pytest.raises(ValueError, match='one device'):
        scan_states_triton([grads.to('meta')], gates[None], gates, gates, [None])
    with torch.no_grad(), kernels.without_launches(), pytest.raises(ValueError, match=r'2\*\*31'):
        # int32 offsets inside a row: P entries 2**20 elements apart
        strided = torch.empty_strided((2, 3, 4096), (3, 1, 2**20), device='meta')
        scan_states_triton([strided], torch.empty(1, 2, 3, device='meta'),
                           *[torch.empty(2, 3, device='meta')] * 2, [None])
    meta = lambda *shape: torch.empty(*shape, device='meta')  # noqa: E731
    # M3's stage 1 at batch 128: w1's states in bf16 cost half their float32 bytes
    n, u, p = 128, 15, 128 * 512
    args = ([meta(n, u, p)], meta(1, n, u), meta(n, u), meta(n, u), [meta(n, p)])
    with torch.no_grad(), kernels.without_launches(), LiveTensorBytes() as live:
        states = scan_states_triton(*args, state_dtypes=[torch.bfloat16])
    assert states[0].shape == (n, u + 1, p) and states[0].dtype == torch.bfloat16
    assert live.peak == n * (u + 1) * p * 2


def test_triton_scan_frees_each_gradient_once_scanned():
    """Handed over in a list, w1's gradient goes before w2's state exists: at
    the peak one gradient and two states (M3's stage 1: 240 MiB less)."""
    from convneur_mm.models.layers.memory_ops import kernels
    from convneur_mm.models.layers.memory_ops.scan import scan_states_triton
    from convneur_mm.testing.dispatch_probes import LiveTensorBytes
    n, u, p = 4, 5, 4096
    gates = [torch.empty(*shape, device='meta') for shape in ((2, n, u), (n, u), (n, u))]
    with torch.no_grad(), kernels.without_launches(), LiveTensorBytes() as live:
        grads = [torch.empty(n, u, p, device='meta', dtype=torch.bfloat16) for _ in range(2)]
        states = scan_states_triton(grads, *gates, [None] * 2, state_dtypes=[torch.bfloat16] * 2)
        assert grads == [None, None]
        assert [tuple(s.shape) for s in states] == [(n, u + 1, p)] * 2  # alive: counted below
        assert live.live == 2 * n * (u + 1) * p * 2
    assert live.peak == n * u * p * 2 + 2 * n * (u + 1) * p * 2
