import pytest
import torch

from convneur_mm.models.layers.memory_ops import (MemoryWeights, memory_forward,
                                                  memory_grads, momentum_decay_states)


def _naive_states(grads, lr_mod, log_keep, log_momentum, initial):
    weights, momentum, states = initial, torch.zeros_like(initial), [initial]
    for t in range(grads.shape[1]):
        momentum = log_momentum[:, t, None].exp() * momentum - lr_mod[:, t, None] * grads[:, t]
        weights = log_keep[:, t, None].exp() * weights + momentum
        states.append(weights)
    return torch.stack(states, dim=1)


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
    torch.testing.assert_close(fast, _naive_states(*args))


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


def test_closed_form_grads_match_autograd_per_chunk():
    torch.manual_seed(0)
    groups, chunks, length, d = 2, 3, 5, 6
    w = MemoryWeights(torch.randn(groups, d, 4 * d).double() * 0.3,
                      torch.randn(groups, 4 * d, d).double() * 0.3,
                      torch.randn(groups, d).double() * 0.1)
    keys = torch.randn(groups, chunks, length, d).double()
    values = torch.randn(groups, chunks, length, d).double()
    lr = torch.rand(groups, chunks, length).double()
    fast = memory_grads(w, keys, values, lr)
    for c in range(chunks):
        leaf = w.map(lambda t: t.clone().requires_grad_())
        pred = memory_forward(leaf, keys[:, c])
        loss = (lr[:, c] * (pred - values[:, c]).pow(2).mean(-1)).sum()
        for got, want in zip(fast, torch.autograd.grad(loss, list(leaf))):
            torch.testing.assert_close(got[:, c], want)
