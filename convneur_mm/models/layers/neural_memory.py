"""Chunked neural memory over the tokens of one image (ConvNeur, Sec. 3.3).

Tokens are split into chunks of length L. Chunk t reads the memory state
W_{t-1} with its queries (the first chunk reads the learned W_0; a trailing
partial chunk reads the last state) and writes into it with its keys/values:

    G_t = rho_t * grad_W L_t,   S_t = eta_t S_{t-1} - G_t,   W_t = (1 - alpha_t) W_{t-1} + S_t

``update='parallel'`` takes every G_t at W_0 (all chunks at once, as the Titans
reference does); ``update='sequential'`` takes G_t at W_{t-1} (the paper's
equations 3-4). Gradients are closed-form and the recursion is a scan, so the
module is one differentiable graph for the outer training. The inner loop runs
in float32 (or float64) even under autocast.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory_ops import (MemoryWeights, memory_forward, memory_grads,
                         momentum_decay_states)
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    class DTensor:  # noqa: D101  (nothing is one)
        pass

from convneur_mm.models.utils.precision import (Float32Linear, Float32RMSNorm, KeepsFloat32, in_float32,
                        narrowed_parameters, widened)
from convneur_mm.models.utils.shapes import known_zero

UPDATE_MODES = ('parallel', 'sequential')
RMS_EPS = 1e-6


class AttentionPool(nn.Module):
    """Per-feature softmax pooling of each chunk; starts as mean pooling."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_logits = Float32Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.to_logits.weight)
        nn.init.zeros_(self.to_logits.bias)

    def forward(self, chunks: Tensor) -> Tensor:
        """(B, T, L, d) -> (B, T, d)."""
        attn = self.to_logits(chunks).softmax(dim=-2)
        return (chunks * attn).sum(dim=-2)


class NeuralMemory(KeepsFloat32, nn.Module):
    """Neural memory on a (B, N, d) token sequence, one state per image.

    Args:
        dim: token width d (the paper's C_m).
        chunk_size: tokens per chunk L.
        max_lr: the inner-loop step size; theta_i = max_lr * sigmoid(.).
        heads: memory heads; d must be divisible by it.
        update: 'parallel' or 'sequential' (see module docstring).
        scan_block: chunks whose states come from one matrix product
            (longer sequences are chained block by block).
    """

    def __init__(self,
                 dim: int,
                 chunk_size: int = 196,
                 max_lr: float = 1.0,
                 heads: int = 1,
                 update: str = 'parallel',
                 scan_block: int = 64):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f'memory dim {dim} is not divisible by heads={heads}')
        if update not in UPDATE_MODES:
            raise ValueError(f'update must be one of {UPDATE_MODES}, got {update!r}')
        if chunk_size < 1:
            raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
        if not max_lr > 0:
            raise ValueError(f'max_lr must be > 0, got {max_lr}')
        if scan_block < 1:
            raise ValueError(f'scan_block must be >= 1, got {scan_block}')
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.max_lr, self.update = chunk_size, max_lr, update
        self.scan_block = scan_block
        hd = self.head_dim

        self.store_norm = Float32RMSNorm(dim, eps=RMS_EPS)
        self.retrieve_norm = Float32RMSNorm(dim, eps=RMS_EPS)
        self.to_keys = Float32Linear(dim, dim, bias=False)
        self.to_values = Float32Linear(dim, dim, bias=False)
        self.to_queries = Float32Linear(dim, dim, bias=False)
        self.key_norm = nn.RMSNorm(hd, eps=RMS_EPS, elementwise_affine=False)
        self.query_norm = nn.RMSNorm(hd, eps=RMS_EPS, elementwise_affine=False)
        self.key_gamma = nn.Parameter(torch.zeros(heads, hd))
        self.query_gamma = nn.Parameter(torch.zeros(heads, hd))

        self.to_token_lr = Float32Linear(dim, heads)
        self.pool = AttentionPool(dim)
        self.to_decay = Float32Linear(dim, heads)
        self.to_momentum = Float32Linear(dim, heads)
        self.to_lr_modulation = Float32Linear(dim, heads * len(MemoryWeights._fields))

        # the learned initial state W_0, one per head
        self.init_w1 = nn.Parameter(torch.empty(heads, hd, 4 * hd))
        self.init_w2 = nn.Parameter(torch.empty(heads, 4 * hd, hd))
        self.init_g = nn.Parameter(torch.zeros(heads, hd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Memory-specific init; the backbone calls it after its generic init."""
        for w in (self.init_w1, self.init_w2):
            for per_head in w.data:
                nn.init.xavier_uniform_(per_head)
        nn.init.zeros_(self.init_g)
        nn.init.zeros_(self.key_gamma)
        nn.init.zeros_(self.query_gamma)
        self.pool.reset_parameters()
        # Gates start at: slow forgetting (alpha ~ 0.12), half momentum and
        # half of the step size per weight tensor.
        for layer, bias in ((self.to_decay, -2.0), (self.to_momentum, 0.0),
                            (self.to_lr_modulation, 0.0), (self.to_token_lr, 0.0)):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.constant_(layer.bias, bias)

    @property
    def initial_state(self) -> MemoryWeights:
        return MemoryWeights(self.init_w1, self.init_w2, self.init_g)

    def update_parameters(self) -> List[nn.Parameter]:
        """Parameters that only feed the write path (unused with one chunk)."""
        modules = (self.store_norm, self.to_keys, self.to_values, self.to_token_lr,
                   self.pool, self.to_decay, self.to_momentum, self.to_lr_modulation)
        return [p for m in modules for p in m.parameters()] + [self.key_gamma]

    def num_updates(self, num_tokens: int) -> int:
        """Chunk updates whose result is read: ceil(N / L) - 1 (N >= 1).

        A floor division rather than ``max(ceil(N / L) - 1, 0)``: under
        symbolic shapes (torch.compile, torch.export) it lets the compiler
        prove that the U * L written tokens fit in N, without a guard."""
        return (num_tokens - 1) // self.chunk_size

    def _split_heads(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (H, B, N, d / H): heads lead, as memory weights do."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).permute(2, 0, 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (B, N, d)."""
        narrowed = narrowed_parameters(self)
        if narrowed:  # FSDP's mixed precision: the maths in float32 all the same
            with widened(self, narrowed):
                return in_float32(self._forward, x)
        return in_float32(self._forward, x)

    def _forward(self, x: Tensor, shape_generic: Optional[bool] = None) -> Tensor:
        """``shape_generic`` (default: while ``torch.export`` traces, as the
        ONNX exporter does) builds one graph for every token count: all
        chunks write (the last state is never read) and the scan is one block,
        so no Python branch or loop depends on the number of chunks. The
        maths are the same; the eager path skips the unread last write."""
        if shape_generic is None:
            shape_generic = torch.compiler.is_exporting()
        b, n, _ = x.shape
        h, hd = self.heads, self.head_dim
        queries = self._split_heads(self.to_queries(self.retrieve_norm(x)))
        queries = self.query_norm(queries) * (1.0 + self.query_gamma[:, None, None])
        if shape_generic:
            num_chunks = (n + self.chunk_size - 1) // self.chunk_size
            padded = F.pad(x, (0, 0, 0, num_chunks * self.chunk_size - n))
            states = self._write(padded, num_chunks, scan_block=None)
            states = states.map(lambda t: _packed(t[:, :, :num_chunks]))  # W_C is unread
            out = self._read(queries, states, always_pad=True)
            return self._merge_heads(out, n)
        num_updates = self.num_updates(n)
        if num_updates == 0:  # one chunk: every token reads W_0
            out = memory_forward(self.initial_state, queries.reshape(h, b * n, hd))
            if torch.is_grad_enabled():
                out = out + self._zero_tie()
            out = out.reshape(h, b, n, hd)
        else:
            states = self._write(x[:, :num_updates * self.chunk_size], num_updates,
                                 self.scan_block)
            out = self._read(queries, states)
        return self._merge_heads(out, n)

    def _merge_heads(self, out: Tensor, n: int) -> Tensor:
        """(H, B, P, d / H) read-outs of P >= N (padded) tokens -> (B, N, d).

        The padding is cut last, from the merged tensor: cutting it first
        would make the merge a copy or a view depending on whether P == N,
        which symbolic shapes would have to guard on."""
        h, b, padded, hd = out.shape
        return out.permute(1, 2, 0, 3).reshape(b, padded, self.dim)[:, :n]

    def _zero_tie(self) -> Tensor:
        """A zero that depends on the write-path parameters.

        With a single chunk the paper's equations read only W_0, so the write
        path gets no gradient; tying it with weight zero gives it an exact zero
        gradient instead of none, which keeps DDP (find_unused_parameters=False)
        and gradient-based tooling working at no measurable cost. Parameters
        of FSDP2 units of their own are skipped: sharded (``DTensor``) outside
        their unit's forward, they cannot meet plain tensors, and FSDP needs
        no tie.
        """
        return sum(p.sum() for p in self.update_parameters()
                   if p.requires_grad and not isinstance(p, DTensor)) * 0.0

    def _write(self, x: Tensor, num_updates: int,
               scan_block: Optional[int]) -> MemoryWeights:
        """States W_0 .. W_U, each of shape (H, B, U + 1, ...), from the U
        chunks of ``x``; ``scan_block`` as in ``momentum_decay_states``."""
        b, L, u, h, hd = x.shape[0], self.chunk_size, num_updates, self.heads, self.head_dim
        s = self.store_norm(x)
        keys = self._split_heads(self.to_keys(s))
        keys = self.key_norm(keys) * (1.0 + self.key_gamma[:, None, None])
        values = self._split_heads(self.to_values(s))
        token_lr = self.max_lr * torch.sigmoid(self.to_token_lr(s)).permute(2, 0, 1)

        # per-chunk gates, stored (H, B, U): flattening them to (H * B, U)
        # below is then a view for any U, with nothing for symbolic shapes
        # to guard on
        summary = self.pool(s.reshape(b, u, L, self.dim))  # (B, U, d)
        log_keep = _packed(F.logsigmoid(-self.to_decay(summary)).permute(2, 0, 1))  # log(1-a)
        log_momentum = _packed(F.logsigmoid(self.to_momentum(summary)).permute(2, 0, 1))
        lr_mod = torch.sigmoid(self.to_lr_modulation(summary)).view(
            b, u, h, len(MemoryWeights._fields))
        lr_mod = _packed(lr_mod.permute(3, 2, 0, 1))  # (3, H, B, U)

        w0 = self.initial_state
        chunks = (h, b, u, L)
        if self.update == 'parallel':
            # all chunks take their gradient at W_0: one batched call
            grads = memory_grads(w0, keys.reshape(h, b * u, L, hd),
                                 values.reshape(h, b * u, L, hd),
                                 token_lr.reshape(h, b * u, L))
            return MemoryWeights(*(
                momentum_decay_states(
                    g.reshape(h * b, u, -1), m.reshape(h * b, u),
                    log_keep.reshape(h * b, u), log_momentum.reshape(h * b, u),
                    init.reshape(h, 1, -1).expand(h, b, -1).reshape(h * b, -1),
                    scan_block).reshape(h, b, u + 1, *init.shape[1:])
                for g, m, init in zip(grads, lr_mod, w0)))
        return self._sequential_states(keys.reshape(*chunks, hd),
                                       values.reshape(*chunks, hd),
                                       token_lr.reshape(chunks), log_keep,
                                       log_momentum, lr_mod)

    def _sequential_states(self, keys: Tensor, values: Tensor, token_lr: Tensor,
                           log_keep: Tensor, log_momentum: Tensor,
                           lr_mod: Tensor) -> MemoryWeights:
        """W_0 .. W_U, each chunk's gradient taken at the previous state."""
        h, b, u, L, hd = keys.shape
        weights = self.initial_state.map(
            lambda t: t[:, None].expand(h, b, *t.shape[1:]))
        history: List[MemoryWeights] = [weights]
        keep, eta = log_keep.exp(), log_momentum.exp()
        # S_0 = 0 explicitly, so that eta_1 is in the graph (with zero gradient)
        # exactly as in the parallel scan.
        momentum = [torch.zeros(()).to(w) for w in weights]
        for t in range(u):
            grads = memory_grads(
                weights.map(lambda w: w.reshape(h * b, *w.shape[2:])),
                keys[:, :, t].reshape(h * b, 1, L, hd),
                values[:, :, t].reshape(h * b, 1, L, hd),
                token_lr[:, :, t].reshape(h * b, 1, L))
            surprise = [-_bcast(m[..., t], g) * g.reshape(h, b, *g.shape[2:])
                        for m, g in zip(lr_mod, grads)]
            momentum = [_bcast(eta[..., t], s) * s_prev + s
                        for s_prev, s in zip(momentum, surprise)]
            weights = MemoryWeights(*(
                _bcast(keep[..., t], w) * w + s for w, s in zip(weights, momentum)))
            history.append(weights)
        return MemoryWeights(*(torch.stack(ts, dim=2) for ts in zip(*history)))

    def _read(self, queries: Tensor, states: MemoryWeights,
              always_pad: bool = False) -> Tensor:
        """Chunk t reads W_{t-1}: queries (H, B, N, hd), states (H, B, C, ...);
        the read-outs of the C * L >= N (zero-padded) tokens, (H, B, C * L, hd).
        With a symbolic N it always pads (maybe by zero): no guard on whether
        N is a multiple of L, so one graph serves both."""
        h, b, n, hd = queries.shape
        num_chunks = states.w1.shape[2]
        padded = num_chunks * self.chunk_size
        if always_pad or not known_zero(padded - n):
            queries = F.pad(queries, (0, 0, 0, padded - n))
        groups = h * b * num_chunks
        out = memory_forward(states.map(lambda t: t.reshape(groups, *t.shape[3:])),
                             queries.reshape(groups, self.chunk_size, hd))
        return out.reshape(h, b, padded, hd)


def _packed(t: Tensor) -> Tensor:
    """A contiguous copy (``.contiguous()`` would first ask whether ``t`` is
    contiguous, a question about its sizes that symbolic shapes guard on)."""
    return t.clone(memory_format=torch.contiguous_format)


def _bcast(coef: Tensor, like: Tensor) -> Tensor:
    """Append singleton dims to ``coef`` so that it broadcasts against ``like``."""
    return coef.reshape(*coef.shape, *([1] * (like.dim() - coef.dim())))
