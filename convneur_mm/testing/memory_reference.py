"""A plain autograd reference of the neural memory, written independently of
the fast path: a per-chunk loop that takes inner gradients with
``torch.autograd.grad(create_graph=True)``. Used by tests and the benchmark.
Also an ATen op counter, the yardstick of the memory's kernel count.
"""
import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _rms(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _memory_model(w1, w2, g, x):
    hidden = F.gelu(x @ w1) @ w2
    return x + F.layer_norm(hidden, hidden.shape[-1:], eps=1e-5) * (1 + g.unsqueeze(-2))


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
        outputs.append(_memory_model(*weights, queries[:, :, sl]))
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
        pred = _memory_model(*at, keys[:, :, sl])
        loss = (theta[:, :, sl] * (pred - values[:, :, sl]).pow(2).mean(-1)).sum()
        grads = torch.autograd.grad(loss, at, create_graph=True)

        def bc(c, like):
            return c.reshape(*c.shape, *([1] * (like.dim() - c.dim())))

        momentum = [bc(eta, m) * m - bc(rho[..., j], gr) * gr
                    for j, (m, gr) in enumerate(zip(momentum, grads))]
        weights = [bc(1 - alpha, w) * w + m for w, m in zip(weights, momentum)]
    out = torch.cat(outputs, dim=2)
    return out.transpose(1, 2).reshape(b, n, d)


class AtenOpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the context (eager mode), by
    name: ``kernels`` those that return a tensor and compute (what a GPU launches), ``views``
    the aliasing ones (views, reshapes, detach), which launch nothing.
    ``bytes``: per kernel op, the bytes of its tensor arguments and results,
    each read or written once: the least memory traffic of an unfused op.

    Used by the tests and ``tools/analysis_tools/count_ops.py`` to compare
    one path of the memory against another by the kernels it launches."""

    def __init__(self):
        super().__init__()
        self.kernels: Counter = Counter()
        self.views: Counter = Counter()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        # ops that return no tensor (``promote_types``) compute nothing on a device
        if outs:
            name = str(func.overloadpacket.__name__)
            (self.views if func.is_view else self.kernels)[name] += 1
            if not func.is_view:
                ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                self.bytes[name] += sum(t.numel() * t.element_size() for t in ins + outs)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def num_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def num_views(self) -> int:
        return sum(self.views.values())
