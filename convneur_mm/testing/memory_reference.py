"""A plain autograd reference of the neural memory, written independently of
the fast path: a per-chunk loop that takes inner gradients with
``torch.autograd.grad(create_graph=True)`` of the memory model's plain read
(``memory_ops.read_naive``). Used by tests and the benchmark.
"""
import math

import torch

from convneur_mm.models.layers.memory_ops import MemoryWeights, read_naive


def _rms(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _memory_model(w1, w2, g, x, gelu_approximate='none'):
    return read_naive(MemoryWeights(w1, w2, g), x, gelu_approximate=gelu_approximate)


def reference_memory(mem, x):
    """Same maths as ``NeuralMemory.forward``; x: (B, N, d)."""
    b, n, d = x.shape
    h, hd, L = mem.heads, mem.head_dim, mem.chunk_size

    def heads(t):
        return t.view(b, n, h, hd).transpose(1, 2)

    s = _rms(x) * mem.store_norm.weight
    keys = _rms(heads(s @ mem.to_keys.weight.T)) * (1 + mem.key_gamma[:, None])
    values = heads(s @ mem.to_values.weight.T)
    xr = _rms(x) * mem.retrieve_norm.weight
    queries = _rms(heads(xr @ mem.to_queries.weight.T)) * (1 + mem.query_gamma[:, None])
    theta = mem.max_lr * torch.sigmoid(s @ mem.to_token_lr.weight.T + mem.to_token_lr.bias)
    theta = theta.transpose(1, 2)  # (B, H, N)

    init = [p.unsqueeze(0).expand(b, *p.shape) for p in
            (mem.init_w1, mem.init_w2, mem.init_g)]
    weights = list(init)
    momentum = [torch.zeros_like(w) for w in weights]
    outputs = []
    num_chunks = math.ceil(n / L)
    for t in range(num_chunks):
        sl = slice(t * L, min((t + 1) * L, n))
        outputs.append(_memory_model(*weights, queries[:, :, sl], mem.gelu_approximate))
        if t == num_chunks - 1:
            break
        chunk_s = s[:, sl]
        logits = chunk_s @ mem.pool.to_logits.weight.T + mem.pool.to_logits.bias
        summary = (chunk_s * logits.softmax(dim=1)).sum(dim=1)  # (B, d)
        alpha = torch.sigmoid(summary @ mem.to_decay.weight.T + mem.to_decay.bias)
        eta = torch.sigmoid(summary @ mem.to_momentum.weight.T + mem.to_momentum.bias)
        rho = torch.sigmoid(summary @ mem.to_lr_modulation.weight.T +
                            mem.to_lr_modulation.bias).view(b, h, -1)
        at = init if mem.update == 'parallel' else weights
        pred = _memory_model(*at, keys[:, :, sl], mem.gelu_approximate)
        loss = (theta[:, :, sl] * (pred - values[:, :, sl]).pow(2).mean(-1)).sum()
        grads = torch.autograd.grad(loss, at, create_graph=True)

        def bc(c, like):
            return c.reshape(*c.shape, *([1] * (like.dim() - c.dim())))

        momentum = [bc(eta, m) * m - bc(rho[..., j], gr) * gr
                    for j, (m, gr) in enumerate(zip(momentum, grads))]
        weights = [bc(1 - alpha, w) * w + m for w, m in zip(weights, momentum)]
    out = torch.cat(outputs, dim=2)
    return out.transpose(1, 2).reshape(b, n, d)
