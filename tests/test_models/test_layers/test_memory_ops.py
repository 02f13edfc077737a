import pytest
import torch

from convneur_mm.models.layers.memory_ops import (MemoryWeights, linear_scan,
                                                  memory_forward, memory_grads)


def _naive_scan(log_decay, inputs, initial):
    state, out = initial, []
    for t in range(inputs.shape[1]):
        state = log_decay[:, t].exp()[:, None] * state + inputs[:, t]
        out.append(state)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize('steps,block', [(1, 64), (7, 3), (16, 64), (130, 64)])
def test_linear_scan_matches_loop(steps, block):
    g = torch.Generator().manual_seed(steps)
    log_decay = torch.nn.functional.logsigmoid(torch.randn(3, steps, generator=g)).double()
    inputs = torch.randn(3, steps, 5, generator=g).double()
    initial = torch.randn(3, 5, generator=g).double()
    fast = linear_scan(log_decay, inputs, initial, block_size=block)
    torch.testing.assert_close(fast, _naive_scan(log_decay, inputs, initial))
    no_init = linear_scan(log_decay, inputs, None, block_size=block)
    torch.testing.assert_close(no_init, _naive_scan(log_decay, inputs, torch.zeros_like(initial)))


def test_linear_scan_survives_tiny_decays():
    # exp(cumsum) underflows over long sequences; the masked form must not NaN
    log_decay = torch.full((1, 300), -50.0)
    inputs = torch.ones(1, 300, 2)
    out = linear_scan(log_decay, inputs, torch.ones(1, 2))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, -1], torch.ones(2), rtol=0, atol=1e-6)


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
