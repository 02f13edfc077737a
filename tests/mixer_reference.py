"""Naive references of the global-branch mixers and the block's fusions,
written from the papers' definitions with loops and explicit formulas, not
from the modules' code paths (no SDPA, no prefix sums, no batched reshapes).
They read the modules' parameters only. Used by test_mixers.py and test_wkv.py.
"""
import math

import torch
import torch.nn.functional as F

from convneur_mm.testing.memory_reference import reference_memory


def conv1x1(x, conv):
    """A 1x1 conv as a per-pixel matrix product."""
    out = torch.einsum('oc,bchw->bohw', conv.weight[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias[:, None, None]


def channel_layer_norm(x, norm):
    """LayerNorm over dim 1 of (B, C, H, W) (or the last dim of (B, N, C) when
    ``last`` is set): explicit mean and biased variance."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + norm.eps)
    return out * norm.weight[:, None, None] + norm.bias[:, None, None]


def token_layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def softmax(logits):
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def tokens_of(x):
    return x.flatten(2).transpose(1, 2)


def map_of(tokens, h, w):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


# ------------------------------------------------------------------ mixers
def self_attention(mod, x):
    """(B, N, d): softmax(Q K^T / sqrt(d_h)) V per head, one query at a time."""
    b, n, d = x.shape
    hd = d // mod.heads
    q, k, v = (x @ mod.qkv.weight.T).split(d, dim=-1)
    out = torch.zeros_like(x)
    for i in range(n):
        for head in range(mod.heads):
            sl = slice(head * hd, (head + 1) * hd)
            weights = softmax((k[:, :, sl] @ q[:, i, sl, None])[..., 0] / math.sqrt(hd))
            out[:, i, sl] = (weights[..., None] * v[:, :, sl]).sum(1)
    return out @ mod.proj.weight.T + mod.proj.bias


def cbam(mod, x):
    """Channel gate from avg- and max-pooled MLP logits, then a spatial gate."""
    fc1, fc2 = mod.channel_mlp[0], mod.channel_mlp[2]

    def mlp(vec):  # (B, C)
        hidden = torch.relu(vec @ fc1.weight[:, :, 0, 0].T + fc1.bias)
        return hidden @ fc2.weight[:, :, 0, 0].T + fc2.bias

    gate = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))
    y = x * gate[:, :, None, None]
    maps = torch.stack([y.amax(1), y.mean(1)], dim=1)
    k = mod.spatial_conv.kernel_size[0]
    padded = F.pad(maps, (k // 2,) * 4)
    h, w = x.shape[-2:]
    spatial = torch.zeros(x.shape[0], h, w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            window = padded[:, :, i:i + k, j:j + k]
            spatial[:, i, j] = (window * mod.spatial_conv.weight[0]).sum((1, 2, 3))
    return y * torch.sigmoid(spatial + mod.spatial_conv.bias)[:, None]


def non_local(mod, x):
    """x + W_z(y), y_i = sum_j softmax_j(theta_i . phi_j * scale) g_j."""
    b, _, h, w = x.shape
    theta, phi, g = (tokens_of(conv1x1(x, c)) for c in (mod.theta, mod.phi, mod.g))
    y = torch.zeros_like(g)
    for i in range(h * w):
        logits = (phi * theta[:, i:i + 1]).sum(-1) * mod.scale
        y[:, i] = (softmax(logits)[..., None] * g).sum(1)
    return x + conv1x1(map_of(y, h, w), mod.conv_out)


def bi_wkv(decay, first, k, v):
    """The Vision-RWKV definition, summed over every pair (O(N^2))."""
    b, n, c = k.shape
    w, u = decay / n, first / n
    out = torch.zeros_like(v)
    for t in range(n):
        num = torch.zeros(b, c, dtype=v.dtype)
        den = torch.zeros(b, c, dtype=v.dtype)
        for i in range(n):
            weight = torch.exp(u + k[:, t] if i == t else -(abs(t - i) - 1) * w + k[:, i])
            num, den = num + weight * v[:, i], den + weight
        out[:, t] = num / den
    return out


def bi_wkv_recurrence(decay, first, k, v):
    """The same, as RWKV's step-by-step recurrence in both directions, float64
    and unstabilized (float64 holds e^k for the keys the tests use)."""
    b, n, c = k.shape
    k, v = k.double(), v.double()
    keep = torch.exp(-decay.double() / n)
    states = []
    for order in (range(n), reversed(range(n))):
        num, den = torch.zeros(b, c, dtype=torch.float64), torch.zeros(b, c, dtype=torch.float64)
        before = [None] * n
        for t in order:  # the state holds the tokens before t in this direction
            before[t] = (num, den)
            num = keep * num + torch.exp(k[:, t]) * v[:, t]
            den = keep * den + torch.exp(k[:, t])
        states.append(before)
    out = torch.zeros(b, n, c, dtype=torch.float64)
    bonus = torch.exp(first.double() / n + k)
    for t in range(n):
        (fn, fd), (bn, bd) = states[0][t], states[1][t]
        out[:, t] = (fn + bn + bonus[:, t] * v[:, t]) / (fd + bd + bonus[:, t])
    return out


def token_shift(x, gamma=0.25):
    """Quarter channel groups from the left, right, top and bottom neighbour."""
    b, c, h, w = x.shape
    group = int(c * gamma)
    out = x.clone()
    offsets = ((0, -1), (0, 1), (-1, 0), (1, 0))  # where each group reads from
    for index, (dy, dx) in enumerate(offsets):
        for ch in range(index * group, (index + 1) * group):
            for i in range(h):
                for j in range(w):
                    si, sj = i + dy, j + dx
                    inside = 0 <= si < h and 0 <= sj < w
                    out[:, ch, i, j] = x[:, ch, si, sj] if inside else 0.0
    return out


def spatial_mix(mod, x):
    b, c, h, w = x.shape
    tokens, shifted = tokens_of(x), tokens_of(token_shift(x, mod.shift_gamma))

    def lerp(mix):
        return tokens * mix + shifted * (1 - mix)

    k = lerp(mod.mix_k) @ mod.key.weight.T
    v = lerp(mod.mix_v) @ mod.value.weight.T
    r = lerp(mod.mix_r) @ mod.receptance.weight.T
    wkv = token_layer_norm(bi_wkv(mod.spatial_decay, mod.spatial_first, k, v), mod.key_norm)
    return (torch.sigmoid(r) * wkv) @ mod.output.weight.T


def ir_rwkv(mod, x):
    h_, w_ = x.shape[-2:]
    conv, norm = mod.expand[0], mod.expand[1]
    hidden = torch.relu(channel_layer_norm(conv1x1(channel_layer_norm(x, mod.norm), conv), norm))
    hidden = hidden + map_of(token_layer_norm(spatial_mix(mod.mix, hidden), mod.mix_norm), h_, w_)
    dw, norm2 = mod.local[0], mod.local[1]
    k = dw.kernel_size[0]
    padded = F.pad(hidden, (k // 2,) * 4)
    local = torch.zeros_like(hidden)
    for i in range(h_):
        for j in range(w_):
            local[:, :, i, j] = (padded[:, :, i:i + k, j:j + k] * dw.weight[:, 0]).sum((2, 3))
    local = channel_layer_norm(local, norm2)
    hidden = hidden + local * torch.sigmoid(local)
    return x + conv1x1(hidden, mod.proj)


def segmented_attention(mod, x):
    """Each segment's tokens attend to the persistent tokens and to their own
    segment (never to other segments or padding)."""
    b, n, d = x.shape
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
    q, k, v = (rms * mod.norm.weight @ mod.to_qkv.weight.T).chunk(3, dim=-1)
    hd, seg = mod.head_dim, mod.segment_len
    out = torch.zeros(b, n, mod.heads * hd, dtype=x.dtype)
    for start in range(0, n, seg):
        rows = slice(start, min(start + seg, n))
        for head in range(mod.heads):
            sl = slice(head * hd, (head + 1) * hd)
            keys = torch.cat([mod.persistent_kv[0, head].expand(b, -1, -1), k[:, rows, sl]], 1)
            values = torch.cat([mod.persistent_kv[1, head].expand(b, -1, -1), v[:, rows, sl]], 1)
            weights = softmax(q[:, rows, sl] @ keys.transpose(1, 2) / math.sqrt(hd))
            out[:, rows, sl] = weights @ values
    return out @ mod.to_out.weight.T


def titans(mod, x):
    h = x + reference_memory(mod.memory, x)
    return h + segmented_attention(mod.attention, h)


MIXER_REFERENCES = {
    'memory': reference_memory, 'attention': self_attention, 'cbam': cbam,
    'nonlocal': non_local, 'rwkv': ir_rwkv, 'titans': titans}


def global_branch(branch, x):
    """proj_out(mixer(proj_in(x))) with the mixer's reference."""
    from convneur_mm.models.layers.mixers import MIXERS
    spec = MIXERS[branch.mixer]
    mixer = getattr(branch, spec.attribute)
    inner = conv1x1(x, branch.proj_in)
    h, w = inner.shape[-2:]
    reference = MIXER_REFERENCES[branch.mixer]
    inner = (map_of(reference(mixer, tokens_of(inner)), h, w) if spec.tokens
             else reference(mixer, inner))
    return conv1x1(inner, branch.proj_out)


# ------------------------------------------------------------------ fusions
def fused(fusion, glob, local, fuse=None):
    """The block's update for each fusion of Table 5, from its definition."""
    if fusion == 'gate':
        return local / (1 + torch.exp(-glob))
    if fusion == 'add':
        return glob + local
    both = torch.cat([glob, local], dim=1)
    return conv1x1(both, fuse)
