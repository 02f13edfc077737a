"""Chunked neural memory over the tokens of one image (ConvNeur, Sec. 3.3).

Tokens are split into chunks of length L. Chunk t reads the memory state
W_{t-1} with its queries (the first chunk reads the learned W_0; a trailing
partial chunk reads the last state) and writes into it with its keys/values:

    G_t = rho_t * grad_W L_t,   S_t = eta_t S_{t-1} - G_t,   W_t = (1 - alpha_t) W_{t-1} + S_t

``update='parallel'`` takes every G_t at W_0 (all chunks at once, as the Titans
reference does); ``update='sequential'`` takes G_t at W_{t-1} (the paper's
equations 3-4). Gradients are closed-form and the recursion is a scan, so the
module is one differentiable graph for the outer training. The inner loop runs
in float32 (or float64) even under autocast; its matrix products may take
16-bit operands (``matmul_dtype``) with float32 accumulation.
"""
from functools import partial
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import memory_kernels
from .memory_ops import (MemoryWeights, decay_carry, memory_forward, memory_grads, product,
                         scan_states)
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    class DTensor:  # noqa: D101  (nothing is one)
        pass

from convneur_mm.models.utils.precision import (Float32Linear, Float32RMSNorm, KeepsFloat32,
                                                autocast_dtype, in_float32,
                                                narrowed_parameters, widened)
from convneur_mm.models.utils.shapes import known_zero

UPDATE_MODES = ('parallel', 'sequential')
RMS_EPS = 1e-6
# memory_cfg['matmul_dtype'] -> the products' operand dtype (None: float32)
MATMUL_DTYPES = {'auto': None, 'float32': None, 'bfloat16': torch.bfloat16,
                 'float16': torch.float16}
KERNELS = ('auto', 'torch', 'triton')
# Below this max_lr a 16-bit read keeps W_0's part apart (memory_forward): at
# 1e-3 the update is ~0.2% of the state, under bfloat16's rounding of it.
DECOMPOSE_BELOW_MAX_LR = 0.5


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


class _Projections(NamedTuple):
    """The memory's token projections and chunk gates, heads leading.

    queries (H, B, N, hd); keys, values (H, B, T, hd); token_lr (H, B, T);
    log_keep, log_momentum (H, B, U); lr_mod (3, H, B, U). Without writes
    (``U = 0``) only ``queries`` is set."""
    queries: Tensor
    keys: Optional[Tensor] = None
    values: Optional[Tensor] = None
    token_lr: Optional[Tensor] = None
    log_keep: Optional[Tensor] = None
    log_momentum: Optional[Tensor] = None
    lr_mod: Optional[Tensor] = None


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
        matmul_dtype: the dtype of the matrix products' operands: 'auto'
            (bfloat16 under CUDA bfloat16 autocast, else float32), 'float32',
            'bfloat16' or 'float16'. Accumulation, states, momentum, the scan,
            LayerNorm statistics and backward, theta, the gates and the
            residual stay float32 (docs/advanced_guides/memory_paths.md).
        kernels: 'auto' (the fused Triton kernels of ``memory_kernels`` in
            eager CUDA inference with 16-bit product operands, else PyTorch),
            'torch' or 'triton' (the kernels for every operand dtype; an
            error where they cannot run).
        working_set_mib: under ``no_grad`` (eager), process slices of images
            whose estimated working set fits this many MiB; the results are
            the same. None: the whole batch at once.
        recompute: in training, save only the memory's input and recompute
            its inner forward in the backward pass.
    """

    def __init__(self,
                 dim: int,
                 chunk_size: int = 196,
                 max_lr: float = 1.0,
                 heads: int = 1,
                 update: str = 'parallel',
                 scan_block: int = 64,
                 matmul_dtype: str = 'auto',
                 kernels: str = 'auto',
                 working_set_mib: Optional[int] = None,
                 recompute: bool = False):
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
        if matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f'matmul_dtype must be one of {tuple(MATMUL_DTYPES)}, '
                             f'got {matmul_dtype!r}')
        if kernels not in KERNELS:
            raise ValueError(f'kernels must be one of {KERNELS}, got {kernels!r}')
        if working_set_mib is not None and (isinstance(working_set_mib, bool) or
                                            not isinstance(working_set_mib, int) or
                                            working_set_mib < 1):
            raise ValueError(f'working_set_mib must be a positive int or None, '
                             f'got {working_set_mib!r}')
        if not isinstance(recompute, bool):
            raise ValueError(f'recompute must be a bool, got {recompute!r}')
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.max_lr, self.update = chunk_size, max_lr, update
        self.scan_block = scan_block
        self.matmul_dtype, self.kernels = matmul_dtype, kernels
        self.working_set_mib, self.recompute = working_set_mib, recompute
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

    def operand_dtype(self, x: Tensor) -> Optional[torch.dtype]:
        """The products' operand dtype for input ``x`` (None: the compute
        dtype, float32 or float64), read before autocast is turned off.

        'auto' takes bfloat16 under CUDA bfloat16 autocast only. Under
        float16 autocast it stays float32: the inner gradients' operands
        (theta * 2 / d times a residual, 1.6e-5 per unit residual at max_lr
        1e-3 and d 128) fall below float16's normal range, and the outer
        backward through 16-bit products would put loss-scaled gradients in
        float16, which the loss-scale headroom was never measured for. On the
        CPU float32 products are faster than bfloat16 ones without AMX."""
        if self.matmul_dtype == 'auto':
            amp = autocast_dtype('cuda') if x.device.type == 'cuda' else None
            return torch.bfloat16 if amp == torch.bfloat16 else None
        return MATMUL_DTYPES[self.matmul_dtype]

    def _split_heads(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (H, B, N, d / H): heads lead, as memory weights do."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).permute(2, 0, 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (B, N, d)."""
        mm = self.operand_dtype(x)
        if self.recompute and self.training and torch.is_grad_enabled():
            # saves x alone; the backward reruns the forward (same maths)
            return checkpoint(self._run, x, mm, use_reentrant=False)
        return self._run(x, mm)

    def _run(self, x: Tensor, mm: Optional[torch.dtype]) -> Tensor:
        narrowed = narrowed_parameters(self)
        # float32 products: the plain one-argument call (wrappers of _forward keep working)
        fn = self._forward if mm is None else partial(self._forward, operand_dtype=mm)
        if narrowed:  # FSDP's mixed precision: the maths in float32 all the same
            with widened(self, narrowed):
                return in_float32(fn, x)
        return in_float32(fn, x)

    def _forward(self, x: Tensor, shape_generic: Optional[bool] = None,
                 operand_dtype: Optional[torch.dtype] = None) -> Tensor:
        """``shape_generic`` (default: while ``torch.export`` traces, as the
        ONNX exporter does) builds one graph for every token count: all
        chunks write (the last state is never read) and the scan is one block,
        so no Python branch or loop depends on the number of chunks. The
        maths are the same; the eager path skips the unread last write."""
        if shape_generic is None:
            shape_generic = torch.compiler.is_exporting()
        b, n, _ = x.shape
        h, hd, mm = self.heads, self.head_dim, operand_dtype
        fused = self._fused_kernels(x, mm)  # never under export: shape_generic's graph
        if shape_generic:
            num_chunks = (n + self.chunk_size - 1) // self.chunk_size
            padded = F.pad(x, (0, 0, 0, num_chunks * self.chunk_size - n))
            proj = self._project(padded, num_chunks, self._projection_dtype(mm))
            states, carry = self._write(proj, scan_block=None, operand_dtype=mm)
            states = states.map(lambda t: _packed(t[:, :, :num_chunks]))  # W_C is unread
            carry = None if carry is None else _packed(carry[:, :, :num_chunks])
            out = self._read(proj.queries, states, carry, mm, always_pad=True)
            return self._merge_heads(out, n)
        slices = self._image_slices(x)
        if slices < b:
            return torch.cat([self._forward(part, False, mm) for part in x.split(slices)])
        num_updates = self.num_updates(n)
        proj = self._project(x, num_updates, self._projection_dtype(mm))
        if num_updates == 0:  # one chunk: every token reads W_0
            read = memory_kernels.memory_forward_fused if fused else memory_forward
            out = read(self.initial_state, proj.queries.reshape(h, b * n, hd), mm)
            if torch.is_grad_enabled():
                out = out + self._zero_tie()
            out = out.reshape(h, b, n, hd)
        elif self.update == 'parallel':
            grads = self._chunk_grads(proj, mm, fused)
            # keys' half of qk stays (queries share it); the values and step
            # sizes go before the scan: only queries and gates are read on
            proj = proj._replace(keys=None, values=None, token_lr=None)
            states, carry = self._scan(grads, proj, self.scan_block, mm)
            out = self._read(proj.queries, states, carry, mm, fused=fused)
        else:
            states, carry = self._write(proj, self.scan_block, mm, fused)
            out = self._read(proj.queries, states, carry, mm, fused=fused)
        return self._merge_heads(out, n)

    def _fused_kernels(self, x: Tensor, operand_dtype: Optional[torch.dtype]) -> bool:
        """Whether this call runs the fused Triton kernels (``kernels``):
        'torch' never; 'auto' where ``_kernels_unavailable`` finds no reason
        not to; 'triton' likewise, and an error naming the reason otherwise."""
        if self.kernels == 'torch':
            return False
        why = self._kernels_unavailable(x, operand_dtype)
        if why is not None and self.kernels == 'triton':
            raise RuntimeError(f"memory_cfg kernels='triton', but the fused Triton kernels "
                               f'cannot run here: {why}')
        return why is None

    def _kernels_unavailable(self, x: Tensor, operand_dtype: Optional[torch.dtype]
                             ) -> Optional[str]:
        """Why the fused kernels cannot serve this call, or None.

        They are forward-only and eager: traced graphs keep the PyTorch path.
        'auto' takes them on CUDA for 16-bit operands only: their float32
        products run on CUDA cores in small tiles, untimed against cuBLAS, so
        float32 inference stays on cuBLAS unless 'triton' asks for them
        ('triton' also runs them in Triton's CPU interpreter)."""
        if torch.is_grad_enabled():
            return 'they are forward-only: run inference under torch.no_grad()'
        if _traced():
            return 'traced graphs (torch.compile, torch.export) keep the PyTorch path'
        if x.dtype != torch.float32:
            return f'they compute float32 memories, not {x.dtype}'
        if self.kernels == 'auto' and (x.device.type != 'cuda' or operand_dtype is None):
            return "'auto' takes them on CUDA with 16-bit product operands only"
        return memory_kernels.unavailable_reason(x.device, self.head_dim,
                                                 operand_dtype or torch.float32)

    def _image_slices(self, x: Tensor) -> int:
        """Images per slice for ``working_set_mib`` (the batch when unsliced).

        Only eager inference slices: traced graphs (compile, export) keep one
        path, and autograd would keep every slice's tensors anyway."""
        b, n, _ = x.shape
        if self.working_set_mib is None or torch.is_grad_enabled() or b == 1 or _traced():
            return b
        per_image = self.working_set_bytes(n, x.element_size())
        return max(1, min(b, (self.working_set_mib * 2**20) // per_image))

    def working_set_bytes(self, num_tokens: int, element_size: int = 4) -> int:
        """Estimated peak bytes of one image's inference at ``num_tokens``
        (the PyTorch path): the largest of its phases, each counting the
        tensors alive together, as ``testing.LiveTensorBytes`` measures them:
        the projections (with the pool's temporaries), the write (queries,
        keys, values and step sizes kept; its (T, d)-wide and two (T, 4d)
        tensors, then the chunks' gradients), the scan (gradients and
        states), the read (states and two (N, 4d) tensors). 10% on top
        covers 16-bit operand copies. Per image: constants (the folded
        projection weights) do not grow with the batch."""
        d, h, n, L = self.dim, self.heads, num_tokens, self.chunk_size
        u = self.num_updates(n)
        if u == 0:  # every token reads W_0: queries, the read's wide tensors
            return int(1.1 * 10 * d * n) * element_size
        written = u * L
        state = 8 * d * d // h + d  # one chunk's w1, w2 and g, all heads
        queries_keys = 2 * d * n
        project = (7 * d + h) * n + 2 * d * written
        kept = queries_keys + (d + h) * written  # and the values, the step sizes
        if self.update == 'sequential':  # the states' history, then their stack
            write = kept + (2 * u + 4) * state + 13 * d * L
        else:
            # the scan frees each tensor's gradients once its states exist,
            # but over several blocks only at the end
            held_grads = u if u > self.scan_block else (u + 1) // 2
            write = max(kept + max(15 * d * written, 10 * d * written + u * state),
                        queries_keys + (u + 2 + held_grads) * state)
        read = queries_keys + (u + 1) * state + 10 * d * (u + 1) * L
        return int(1.1 * max(project, write, read)) * element_size

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

    # ------------------------------------------------------------------ projections
    def _projection_dtype(self, operand_dtype: Optional[torch.dtype]
                          ) -> Optional[torch.dtype]:
        """The projections' operand dtype: full precision for a decomposed
        read, whose W_0 part needs queries at float32 accuracy."""
        return None if self._decomposed_read(operand_dtype) else operand_dtype

    def _project(self, x: Tensor, num_updates: int,
                 operand_dtype: Optional[torch.dtype] = None,
                 fused: Optional[bool] = None) -> _Projections:
        """Queries of every token of ``x`` (B, N, d); keys, values, token
        learning rates and gates of its first ``num_updates`` chunks.

        ``fused`` (default: where the layers are plain, see ``_fusable``)
        folds the two RMSNorms' weights into one product of every projection,
        computed at run time from the unchanged parameters: the same maths
        in fewer kernels. Otherwise each layer is called."""
        if fused is None:
            fused = self._fusable()
        if fused:
            return self._project_fused(x, num_updates, operand_dtype)
        return self._project_layers(x, num_updates)

    def _fusable(self) -> bool:
        """The projection layers are this module's own plain layers
        (``plain_layers``), so their weights may be folded together."""
        return plain_layers(
            (self.store_norm, Float32RMSNorm), (self.retrieve_norm, Float32RMSNorm),
            (self.to_queries, Float32Linear), (self.to_keys, Float32Linear),
            (self.to_values, Float32Linear), (self.to_token_lr, Float32Linear),
            (self.pool, AttentionPool), (self.pool.to_logits, Float32Linear),
            (self.to_decay, Float32Linear), (self.to_momentum, Float32Linear),
            (self.to_lr_modulation, Float32Linear))

    def _project_layers(self, x: Tensor, u: int) -> _Projections:
        """``_project`` by calling each layer (the reference for the fused path)."""
        queries = self._split_heads(self.to_queries(self.retrieve_norm(x)))
        queries = self.query_norm(queries) * (1.0 + self.query_gamma[:, None, None])
        if u == 0:
            return _Projections(queries)
        b, L, h = x.shape[0], self.chunk_size, self.heads
        s = self.store_norm(x[:, :u * L])
        keys = self._split_heads(self.to_keys(s))
        keys = self.key_norm(keys) * (1.0 + self.key_gamma[:, None, None])
        values = self._split_heads(self.to_values(s))
        token_lr = self.max_lr * torch.sigmoid(self.to_token_lr(s)).permute(2, 0, 1)
        summary = self.pool(s.reshape(b, u, L, self.dim))  # (B, U, d)
        gates = torch.cat([self.to_decay(summary), self.to_momentum(summary),
                           self.to_lr_modulation(summary)], dim=-1)
        return _Projections(queries, keys, values, token_lr, *self._gates(gates, b, u))

    def _project_fused(self, x: Tensor, u: int,
                       operand_dtype: Optional[torch.dtype] = None) -> _Projections:
        """``_project`` as one product of x / rms(x) by every projection's
        weight (the norms' weights folded in), one RMSNorm of queries and
        keys together, and one product for the three gates."""
        b, n, d = x.shape
        h, hd, L = self.heads, self.head_dim, self.chunk_size

        def w(t: Tensor) -> Tensor:  # FSDP's mixed precision may hand 16-bit weights
            return t if t.dtype == x.dtype else t.to(x.dtype)

        retrieve, store = w(self.retrieve_norm.weight), w(self.store_norm.weight)
        # x / rms(x): shared by both norms, whose weights fold into the product
        normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)

        def linear(inputs: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
            """inputs @ weight.T (+ bias) as one product (``inputs`` an argument,
            not a closure's: Dynamo cannot trace a ``del`` of a closure's variable)."""
            flat, weight = inputs.reshape(1, b * n, d), weight.t().unsqueeze(0)
            if bias is not None and operand_dtype is None:
                return torch.baddbmm(bias, flat, weight).view(b, n, -1)
            out = product(flat, weight, operand_dtype).view(b, n, -1)
            return out if bias is None else out + bias

        if u == 0:
            queries = self._split_heads(linear(normed, w(self.to_queries.weight) * retrieve))
            return _Projections(
                self.query_norm(queries) * (1.0 + self.query_gamma[:, None, None]))
        weight = torch.cat([w(self.to_queries.weight) * retrieve, torch.cat([
            w(self.to_keys.weight), w(self.to_values.weight), w(self.pool.to_logits.weight),
            w(self.to_token_lr.weight)]) * store])
        bias = F.pad(torch.cat([w(self.pool.to_logits.bias), w(self.to_token_lr.bias)]),
                     (3 * d, 0))
        proj = linear(normed, weight, bias)  # (B, N, 4d + H): queries, keys, values, logits, lr
        qk = proj[..., :2 * d].reshape(b, n, 2 * h, hd)
        gamma = torch.cat([self.query_gamma, self.key_gamma])  # (2H, hd)
        qk = F.rms_norm(qk, (hd,), eps=RMS_EPS) * (1.0 + gamma)
        queries = qk[..., :h, :].permute(2, 0, 1, 3)
        written = slice(0, u * L)
        keys = qk[:, written, h:].permute(2, 0, 1, 3)
        token_lr = self.max_lr * torch.sigmoid(proj[:, written, 4 * d:]).permute(2, 0, 1)
        # the pool: softmax over each chunk of the logits, the weighted sum of
        # the store-normed tokens (their norm weight applied after the sum)
        attn = proj[:, written, 3 * d:4 * d].reshape(b, u, L, d).softmax(dim=-2)
        summary = (normed[:, written].reshape(b, u, L, d) * attn).sum(dim=-2) * store
        del attn, normed  # before the values' copy below
        values = proj[:, written, 2 * d:3 * d]
        if not torch.is_grad_enabled():
            # a copy of the values frees proj (B, N, 4d + H), about four times
            # their size, when this returns: its other columns are read here only
            values = values.contiguous()
        values = self._split_heads(values)
        gate_layers = (self.to_decay, self.to_momentum, self.to_lr_modulation)
        gates = F.linear(summary, torch.cat([w(m.weight) for m in gate_layers]),
                         torch.cat([w(m.bias) for m in gate_layers]))
        return _Projections(queries, keys, values, token_lr, *self._gates(gates, b, u))

    def _gates(self, gates: Tensor, b: int, u: int) -> Tuple[Tensor, Tensor, Tensor]:
        """(B, U, 5H) decay, momentum and lr-modulation logits -> log(1 - alpha)
        and log(eta), (H, B, U), and rho, (3, H, B, U).

        Stored (H, B, U): flattening them to (H * B, U) is then a view for any
        U, with nothing for symbolic shapes to guard on."""
        h = self.heads
        log_keep = _packed(F.logsigmoid(-gates[..., :h]).permute(2, 0, 1))
        log_momentum = _packed(F.logsigmoid(gates[..., h:2 * h]).permute(2, 0, 1))
        lr_mod = torch.sigmoid(gates[..., 2 * h:]).view(b, u, h, len(MemoryWeights._fields))
        return log_keep, log_momentum, _packed(lr_mod.permute(3, 2, 0, 1))

    # ------------------------------------------------------------------ write and read
    def _decomposed_read(self, operand_dtype: Optional[torch.dtype]) -> bool:
        """Read ``a_t * (q @ W_0)`` at full precision plus ``q @ dW_t`` in 16
        bits, for 16-bit operands at a small step size, whose updates the
        rounding of the whole state would erase."""
        return operand_dtype is not None and self.max_lr < DECOMPOSE_BELOW_MAX_LR

    def _write(self, proj: _Projections, scan_block: Optional[int],
               operand_dtype: Optional[torch.dtype] = None, fused: bool = False
               ) -> Tuple[MemoryWeights, Optional[Tensor]]:
        """States W_0 .. W_U, each of shape (H, B, U + 1, ...), from the
        projections' U chunks, and None; for a decomposed read, dW_t in place
        of W_t for ``w1`` and ``w2`` and a_t, (H, B, U + 1).
        ``scan_block`` as in ``momentum_decay_states``; ``fused``: the
        parallel mode's gradients by the fused kernels."""
        if self.update == 'parallel':
            return self._scan(self._chunk_grads(proj, operand_dtype, fused), proj, scan_block,
                              operand_dtype)
        h, b, t, hd = proj.keys.shape
        u = proj.log_keep.shape[-1]
        L = t // u
        states, carry = self._sequential_states(
            proj.keys.reshape(h, b, u, L, hd), proj.values.reshape(h, b, u, L, hd),
            proj.token_lr.reshape(h, b, u, L), proj.log_keep, proj.log_momentum,
            proj.lr_mod, operand_dtype)
        if not self._decomposed_read(operand_dtype):
            return states, None
        w0 = self.initial_state
        delta = [w - _bcast(carry, w) * w0[i][:, None, None] for i, w in
                 enumerate(states[:2])]
        return MemoryWeights(*delta, states.g), carry

    def _chunk_grads(self, proj: _Projections, operand_dtype: Optional[torch.dtype],
                     fused: bool = False) -> List[Tensor]:
        """The parallel mode's chunk gradients, all taken at W_0 in one
        batched call: w1, w2, g, each (H, B * U, ...)."""
        h, b, t, hd = proj.keys.shape
        u = proj.log_keep.shape[-1]
        L = t // u
        if fused:  # the kernels read the projections' views per image: no copy
            chunks = (proj.keys.unflatten(2, (u, L)), proj.values.unflatten(2, (u, L)),
                      proj.token_lr.unflatten(2, (u, L)))
            return list(memory_kernels.memory_grads_fused(self.initial_state, *chunks,
                                                          operand_dtype))
        return list(memory_grads(self.initial_state, proj.keys.reshape(h, b * u, L, hd),
                                 proj.values.reshape(h, b * u, L, hd),
                                 proj.token_lr.reshape(h, b * u, L), operand_dtype))

    def _scan(self, grads: List[Tensor], proj: _Projections, scan_block: Optional[int],
              operand_dtype: Optional[torch.dtype] = None
              ) -> Tuple[MemoryWeights, Optional[Tensor]]:
        """``_write``'s states from the chunk gradients (consumed: each goes
        once scanned) and the projections' gates."""
        h, b, u = proj.log_keep.shape
        decomposed = self._decomposed_read(operand_dtype)
        w0 = self.initial_state
        log_keep = proj.log_keep.reshape(h * b, u)
        starts = [None if decomposed and i < 2 else
                  init.reshape(h, 1, -1).expand(h, b, -1).reshape(h * b, -1)
                  for i, init in enumerate(w0)]
        flat = [g.reshape(h * b, u, -1) for g in grads]
        grads.clear()  # the caller's list too: scan_states frees each gradient once scanned
        states = [s.reshape(h, b, u + 1, *init.shape[1:]) for s, init in zip(
            scan_states(flat, proj.lr_mod.reshape(-1, h * b, u), log_keep,
                        proj.log_momentum.reshape(h * b, u), starts, scan_block), w0)]
        carry = decay_carry(log_keep).reshape(h, b, u + 1) if decomposed else None
        return MemoryWeights(*states), carry

    def _sequential_states(self, keys: Tensor, values: Tensor, token_lr: Tensor,
                           log_keep: Tensor, log_momentum: Tensor, lr_mod: Tensor,
                           operand_dtype: Optional[torch.dtype] = None
                           ) -> Tuple[MemoryWeights, Tensor]:
        """W_0 .. W_U, each chunk's gradient taken at the previous state, and
        a_t (H, B, U + 1)."""
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
                token_lr[:, :, t].reshape(h * b, 1, L), operand_dtype)
            surprise = [-_bcast(m[..., t], g) * g.reshape(h, b, *g.shape[2:])
                        for m, g in zip(lr_mod, grads)]
            momentum = [_bcast(eta[..., t], s) * s_prev + s
                        for s_prev, s in zip(momentum, surprise)]
            weights = MemoryWeights(*(
                _bcast(keep[..., t], w) * w + s for w, s in zip(weights, momentum)))
            history.append(weights)
        states = MemoryWeights(*(torch.stack(ts, dim=2) for ts in zip(*history)))
        return states, decay_carry(log_keep)

    def _read(self, queries: Tensor, states: MemoryWeights,
              carry: Optional[Tensor] = None,
              operand_dtype: Optional[torch.dtype] = None,
              always_pad: bool = False, fused: bool = False) -> Tensor:
        """Chunk t reads W_{t-1}: queries (H, B, N, hd), states (H, B, C, ...)
        (with ``carry`` (H, B, C): dW and a_t, see ``memory_forward``); the
        read-outs of the C * L >= N (zero-padded) tokens, (H, B, C * L, hd).
        With a symbolic N it always pads (maybe by zero): no guard on whether
        N is a multiple of L, so one graph serves both. ``fused``: by the fused
        kernel, which reads no padding and writes the heads merged: the N
        read-outs as a view that ``_merge_heads`` turns back without a copy."""
        h, b, n, hd = queries.shape
        if fused:
            out = memory_kernels.read_chunks_fused(
                states, queries, self.chunk_size, operand_dtype,
                base=None if carry is None else self.initial_state, carry=carry)
            return out.view(b, n, h, hd).permute(2, 0, 1, 3)
        num_chunks = states.w1.shape[2]
        padded = num_chunks * self.chunk_size
        if always_pad or not known_zero(padded - n):
            queries = F.pad(queries, (0, 0, 0, padded - n))
        groups = h * b * num_chunks
        out = memory_forward(states.map(lambda t: t.reshape(groups, *t.shape[3:])),
                             queries.reshape(groups, self.chunk_size, hd), operand_dtype,
                             base=None if carry is None else self.initial_state,
                             carry=None if carry is None else carry.reshape(groups))
        return out.reshape(h, b, padded, hd)


def plain_layers(*layers: Tuple[nn.Module, type]) -> bool:
    """Each ``(layer, cls)``: the layer is exactly a ``cls``, not wrapped or
    sharded (FSDP), and no forward hook, its own or global (a FLOP counter's,
    a user's), waits to see it called. Only then may a caller compute with
    its weights directly instead of calling it."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    for layer, cls in layers:
        if type(layer) is not cls or layer._forward_hooks or layer._forward_pre_hooks:
            return False
        if any(isinstance(p, DTensor) for p in layer.parameters()):
            return False
    return True


def _traced() -> bool:
    """Inside torch.compile or torch.export: such graphs keep one eager-equivalent path."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _packed(t: Tensor) -> Tensor:
    """A contiguous copy (``.contiguous()`` would first ask whether ``t`` is
    contiguous, a question about its sizes that symbolic shapes guard on)."""
    return t.clone(memory_format=torch.contiguous_format)


def _bcast(coef: Tensor, like: Tensor) -> Tensor:
    """Append singleton dims to ``coef`` so that it broadcasts against ``like``."""
    return coef.reshape(*coef.shape, *([1] * (like.dim() - coef.dim())))
