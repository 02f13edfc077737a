"""Chunked neural memory over the tokens of one image (ConvNeur, Sec. 3.3).

Tokens are split into chunks of length L. Chunk t reads the memory state
W_{t-1} with its queries (the first chunk reads the learned W_0; a trailing
partial chunk reads the last state) and writes into it with its keys/values:

    G_t = rho_t * grad_W L_t,   S_t = eta_t S_{t-1} - G_t,   W_t = (1 - alpha_t) W_{t-1} + S_t

``update='parallel'`` takes every G_t at W_0 (all chunks at once, as the Titans
reference does); ``update='sequential'`` takes G_t at W_{t-1} (the paper's
equations 3-4). Gradients are closed-form and the recursion is a scan, so the
module is one differentiable graph for the outer training; the chunk
gradients and reads train through hand-derived backward passes
(``backward``), with no double backward. The inner loop runs
in float32 (or float64) even under autocast; its matrix products may take
16-bit operands (``operand_dtype``) with float32 accumulation.

A call is decided once (``NeuralMemory.plan``, by ``memory_ops.dispatch``: a
``MemoryPlan``) and then executed on one path (``NeuralMemory.execute``)
through the operations of ``memory_ops``: projections, ``chunk_grads``,
``scan_states``, ``chunk_read`` (``read`` for a single chunk), each by the
plan's implementation.
"""
import dataclasses
import math
import numbers
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .memory_ops import MemoryWeights, decay_carry, scan_states, scan_states_triton
from .memory_ops.chunk_grads import chunk_grads, chunk_grads_triton_staged
from .memory_ops.chunk_read import chunk_read
from .memory_ops.common import RMS_EPS, check_gelu_approximate
from .memory_ops.dispatch import (IMPLEMENTATION_CHOICES, OPERAND_DTYPE_CHOICES, MemoryPlan,
                                  PathSettings, operand_dtype_for, plan_memory)
from .memory_ops.gates import GateWeights, chunk_gates, gates_from_logits, packed
from .memory_ops.project import ProjectionWeights, project
from .memory_ops.read import read
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    class DTensor:  # noqa: D101  (nothing is one)
        pass

from convneur_mm.models.utils.precision import (Float32Linear, Float32RMSNorm, KeepsFloat32,
                                                at_least_float32, in_float32,
                                                narrowed_parameters, widened)
from convneur_mm.models.utils.renamed_keys import accepts_renamed_keys

UPDATE_MODES = ('parallel', 'sequential')
BACKWARDS = ('closed_form', 'autograd')
# old name -> new name: the old names are still accepted, with a FutureWarning
RENAMED_KEYS = {'matmul_dtype': 'operand_dtype', 'kernels': 'implementation'}


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


class MemoryProjections(NamedTuple):
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


@accepts_renamed_keys(RENAMED_KEYS)
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
        operand_dtype: the dtype of the matrix products' operands: 'auto'
            (bfloat16 under CUDA bfloat16 autocast, else float32), 'float32',
            'bfloat16' or 'float16'. Accumulation, states, momentum, the scan,
            LayerNorm statistics and backward, theta, the gates and the
            residual stay float32 (docs/advanced_guides/memory_paths.md).
        implementation: which code computes the memory's operations (``memory_ops``):
            'auto' (the Triton kernels in eager CUDA inference where a GPU of
            the same kind measured them faster at the same tiled head width,
            ``kernels.tuned.MEASURED_PATHS``: bf16 operands on sm_90, C_m 65 to
            128; else PyTorch), 'torch' or 'triton'
            (the Triton kernels for every operand dtype, in inference and in
            training, with their backward kernels; an error where they
            cannot run).
        working_set_mib: under ``no_grad`` (eager), process slices of images
            whose estimated working set fits this many MiB; the results are
            the same. None: the whole batch at once.
        recompute: in training, save only the memory's input and recompute
            its inner forward in the backward pass.
        backward: how training differentiates the projections, chunk
            gradients and reads of the PyTorch path: 'closed_form' (the
            default: their hand-derived backward, wherever they train except
            under ``torch.export``) or 'autograd' (through their ops, the
            double backward of the inner gradient included). The results
            agree to rounding; the closed form saves less and trained faster
            on an H200. Either is of first order where the memory writes
            (docs/advanced_guides/memory_paths.md).
        gelu_approximate: the memory MLP's GELU, as ``F.gelu``'s
            ``approximate``: 'none' (exact, erf; the default) or 'tanh' (its
            tanh form, on every path: one exp per element in the kernels'
            loops). The two differ by at most 5e-4 per activation; a
            checkpoint trained with one is read with the same.

    ``matmul_dtype`` and ``kernels``, the former names of ``operand_dtype``
    and ``implementation`` (``RENAMED_KEYS``), are still accepted, as
    arguments and attributes, with a ``FutureWarning``.
    """

    def __init__(self,
                 dim: int,
                 chunk_size: int = 196,
                 max_lr: float = 1.0,
                 heads: int = 1,
                 update: str = 'parallel',
                 scan_block: int = 64,
                 operand_dtype: str = 'auto',
                 implementation: str = 'auto',
                 working_set_mib: Optional[int] = None,
                 recompute: bool = False,
                 backward: str = 'closed_form',
                 gelu_approximate: str = 'none'):
        super().__init__()
        for name, value in dict(dim=dim, heads=heads, chunk_size=chunk_size,
                                scan_block=scan_block).items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f'{name} must be an int >= 1, got {value!r}')
        if dim % heads != 0:
            raise ValueError(f'memory dim {dim} is not divisible by heads={heads}')
        if update not in UPDATE_MODES:
            raise ValueError(f'update must be one of {UPDATE_MODES}, got {update!r}')
        if isinstance(max_lr, bool) or not isinstance(max_lr, numbers.Real) or not (
                0 < max_lr < math.inf):
            raise ValueError(f'max_lr must be a finite number > 0, got {max_lr!r}')
        if operand_dtype not in OPERAND_DTYPE_CHOICES:
            raise ValueError(f'operand_dtype must be one of {tuple(OPERAND_DTYPE_CHOICES)}, '
                             f'got {operand_dtype!r}')
        if implementation not in IMPLEMENTATION_CHOICES:
            raise ValueError(f'implementation must be one of {IMPLEMENTATION_CHOICES}, '
                             f'got {implementation!r}')
        if working_set_mib is not None and (isinstance(working_set_mib, bool) or
                                            not isinstance(working_set_mib, int) or
                                            working_set_mib < 1):
            raise ValueError(f'working_set_mib must be a positive int or None, '
                             f'got {working_set_mib!r}')
        if not isinstance(recompute, bool):
            raise ValueError(f'recompute must be a bool, got {recompute!r}')
        if backward not in BACKWARDS:
            raise ValueError(f'backward must be one of {BACKWARDS}, got {backward!r}')
        check_gelu_approximate(gelu_approximate)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.max_lr, self.update = chunk_size, max_lr, update
        self.scan_block = scan_block
        self.operand_dtype, self.implementation = operand_dtype, implementation
        self.working_set_mib, self.recompute = working_set_mib, recompute
        self.backward, self.gelu_approximate = backward, gelu_approximate
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

    def operand_dtype_for(self, x: Tensor) -> Optional[torch.dtype]:
        """The products' operand dtype for input ``x`` (None: the compute
        dtype, float32 or float64), read before autocast is turned off
        (``dispatch.operand_dtype_for``)."""
        return operand_dtype_for(self.operand_dtype, x)

    def _split_heads(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (H, B, N, d / H): heads lead, as memory weights do."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).permute(2, 0, 1, 3)

    # ------------------------------------------------------------------ the plan
    def plan(self, x: Tensor) -> MemoryPlan:
        """How ``forward(x)`` computes here and now (``dispatch.plan_memory``):
        decided once per call, before autocast is turned off.

        Args:
            x: the (B, N, d) input, as ``forward`` gets it.

        Raises:
            RuntimeError: ``implementation='triton'`` where the Triton kernels
                cannot serve this call (the error names why).
        """
        settings = PathSettings(self.implementation, self.operand_dtype, self.update,
                                self.max_lr, self.backward, self.recompute, self.dim,
                                self.head_dim)
        plan = plan_memory(x, settings, self.training, x.shape[0], self._plain_projections())
        images = self._images_per_slice(x, plan)
        return plan if images == x.shape[0] else dataclasses.replace(plan,
                                                                     images_per_slice=images)

    def _images_per_slice(self, x: Tensor, plan: MemoryPlan) -> int:
        """Images per slice for ``working_set_mib`` (the batch when unsliced),
        priced for ``plan``'s path.

        Only eager inference slices: traced graphs (compile, export) keep one
        path, and autograd would keep every slice's tensors anyway."""
        b, n, _ = x.shape
        if self.working_set_mib is None or torch.is_grad_enabled() or b == 1 or _traced():
            return b
        per_image = self.working_set_bytes(n, at_least_float32(x.dtype).itemsize, plan)
        return max(1, min(b, (self.working_set_mib * 2**20) // per_image))

    def _plain_projections(self) -> bool:
        """The projection layers are this module's own plain layers
        (``plain_layers``), so their weights may be folded together."""
        return plain_layers(
            (self.store_norm, Float32RMSNorm), (self.retrieve_norm, Float32RMSNorm),
            (self.to_queries, Float32Linear), (self.to_keys, Float32Linear),
            (self.to_values, Float32Linear), (self.to_token_lr, Float32Linear),
            (self.pool, AttentionPool), (self.pool.to_logits, Float32Linear),
            (self.to_decay, Float32Linear), (self.to_momentum, Float32Linear),
            (self.to_lr_modulation, Float32Linear))

    # ------------------------------------------------------------------ the path
    def forward(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (B, N, d): ``execute(x, plan(x))``.

        Raises:
            TypeError: ``x`` is not floating-point.
            RuntimeError: under a ``torch.func`` transform (``vmap``, ``grad``,
                ``jacrev``, ...), which neither path supports.
        """
        if not x.is_floating_point():
            raise TypeError(f'NeuralMemory takes floating-point features, got {x.dtype}')
        if not _traced() and _functorch_transforms_active():
            # its Functions and kernels have no batching rules, and its backward
            # is of first order only, where torch.func.grad differentiates twice
            raise RuntimeError(
                'NeuralMemory does not run under torch.func transforms (vmap, grad, jacrev, '
                '...): batch the images instead (it takes (B, N, d)) and differentiate with '
                'torch.autograd, to first order')
        return self.execute(x, self.plan(x))

    def execute(self, x: Tensor, plan: MemoryPlan) -> Tensor:
        """(B, N, d) -> (B, N, d) as ``plan`` says (``plan(x)``, or a variant
        of it made with ``dataclasses.replace``: the same maths in another
        precision or graph). The plan is taken as given: a 'triton' plan
        under autograd fails in the kernels' own checks.

        Args:
            x: the input.
            plan: how to compute it.
        """
        if plan.recompute:
            # saves x alone; the backward reruns the forward (same maths)
            return checkpoint(self._in_float32, x, plan, use_reentrant=False)
        return self._in_float32(x, plan)

    def _in_float32(self, x: Tensor, plan: MemoryPlan) -> Tensor:
        narrowed = narrowed_parameters(self)
        if narrowed:  # FSDP's mixed precision: the maths in float32 all the same
            with widened(self, narrowed):
                return in_float32(lambda t: self._sliced(t, plan), x)
        return in_float32(lambda t: self._sliced(t, plan), x)

    def _sliced(self, x: Tensor, plan: MemoryPlan) -> Tensor:
        if plan.images_per_slice < x.shape[0]:
            return torch.cat([self._compute(part, plan)
                              for part in x.split(plan.images_per_slice)])
        return self._compute(x, plan)

    def _compute(self, x: Tensor, plan: MemoryPlan) -> Tensor:
        """The memory on whole images: project, write (chunk gradients and
        scan, or the sequential loop), read."""
        b, n, _ = x.shape
        h, hd, L, mm = self.heads, self.head_dim, self.chunk_size, plan.operand_dtype
        if plan.shape_generic:
            # all chunks write (the last state is never read): no Python
            # branch or loop depends on the number of chunks
            num_updates = (n + L - 1) // L
            x = F.pad(x, (0, 0, 0, num_updates * L - n))
        else:
            num_updates = self.num_updates(n)
        proj = self.project(x, num_updates, plan)
        if num_updates == 0:  # one chunk: every token reads W_0
            out = read(self.initial_state, proj.queries.reshape(h, b * n, hd), mm,
                       implementation=plan.implementation, backward=plan.backward,
                       gelu_approximate=self.gelu_approximate)
            if torch.is_grad_enabled():
                out = out + self._zero_tie()
            return out.reshape(h, b, n, hd).permute(1, 2, 0, 3).reshape(b, n, self.dim)
        if self.update == 'parallel':
            write = self._chunk_grads(proj, plan)
            # keys, values and step sizes go before the scan (in inference
            # through the kernels, before w1's and w2's gradients exist): only
            # queries and gates are read on
            proj = proj._replace(keys=None, values=None, token_lr=None)
            grads = write()
            del write  # and with it the kernels' scratch
            states, carry = self._scan(grads, proj, plan)
        else:
            states, carry = self._sequential_write(proj, plan)
        if plan.shape_generic:  # W_C is unread
            states = states.map(lambda t: packed(t[:, :, :num_updates]))
            carry = None if carry is None else packed(carry[:, :, :num_updates])
        out = chunk_read(states, proj.queries, L, mm,
                         base=None if carry is None else self.initial_state, carry=carry,
                         implementation=plan.implementation, backward=plan.backward,
                         gelu_approximate=self.gelu_approximate)
        return out[:, :n] if plan.shape_generic else out

    def _chunk_grads(self, proj: MemoryProjections, plan: MemoryPlan
                     ) -> Callable[[], List[Tensor]]:
        """The parallel mode's chunk gradients, all taken at W_0 in one call,
        from the projections' views of each image's U chunks: w1, w2, g,
        each (H, B * U, ...), returned by the callable this returns. In
        inference through the kernels this call runs their rows pass and the
        callable their weights' pass (``chunk_grads_triton_staged``), so that
        keys, values and step sizes can go before w1's and w2's gradients are
        allocated. Those are written in the dtype the scan writes their
        states in (``_grads_dtype``): with 16-bit operands, half their bytes."""
        args = (self.initial_state, *_per_image_chunks(proj), plan.operand_dtype)
        grads_dtype = _grads_dtype(plan)
        if plan.implementation == 'triton' and not torch.is_grad_enabled() and not _traced():
            weights_pass = chunk_grads_triton_staged(
                *args, gelu_approximate=self.gelu_approximate, grads_dtype=grads_dtype)
            return lambda: list(weights_pass())
        grads = list(chunk_grads(*args, implementation=plan.implementation,
                                 backward=plan.backward, gelu_approximate=self.gelu_approximate,
                                 grads_dtype=grads_dtype))
        return lambda: grads

    def _sequential_write(self, proj: MemoryProjections, plan: MemoryPlan
                          ) -> Tuple[MemoryWeights, Optional[Tensor]]:
        """The sequential mode's states (as ``_scan``'s): each chunk's
        gradient taken at the previous state."""
        states, carry = self._sequential_states(*_per_image_chunks(proj), proj.log_keep,
                                                proj.log_momentum, proj.lr_mod,
                                                plan.operand_dtype, plan.backward)
        if not plan.decomposed_read:
            return states, None
        w0 = self.initial_state
        delta = [w - _bcast(carry, w) * w0[i][:, None, None] for i, w in
                 enumerate(states[:2])]
        return MemoryWeights(*delta, states.g), carry

    def _scan(self, grads: List[Tensor], proj: MemoryProjections, plan: MemoryPlan
              ) -> Tuple[MemoryWeights, Optional[Tensor]]:
        """States W_0 .. W_U, each of shape (H, B, U + 1, ...), from the chunk
        gradients (consumed: each goes once scanned) and the projections'
        gates, and None; for a decomposed read, dW_t in place of W_t for
        ``w1`` and ``w2`` and a_t, (H, B, U + 1). The shape-generic graph
        scans in one block."""
        h, b, u = proj.log_keep.shape
        decomposed = plan.decomposed_read
        scan_block = None if plan.shape_generic else self.scan_block
        w0 = self.initial_state
        log_keep = proj.log_keep.reshape(h * b, u)
        starts = [None if decomposed and i < 2 else
                  init.reshape(h, 1, -1).expand(h, b, -1).reshape(h * b, -1)
                  for i, init in enumerate(w0)]
        flat = [g.reshape(h * b, u, -1) for g in grads]
        grads.clear()  # the caller's list too: scan_states frees each gradient once scanned
        gates = (proj.lr_mod.reshape(-1, h * b, u), log_keep, proj.log_momentum.reshape(h * b, u))
        if plan.scan == 'triton':
            scanned = scan_states_triton(flat, *gates, starts,
                                         state_dtypes=_scan_state_dtypes(plan))
        else:
            scanned = scan_states(flat, *gates, starts, scan_block)
        states = [s.reshape(h, b, u + 1, *init.shape[1:]) for s, init in zip(scanned, w0)]
        carry = decay_carry(log_keep).reshape(h, b, u + 1) if decomposed else None
        return MemoryWeights(*states), carry

    def _sequential_states(self, keys: Tensor, values: Tensor, token_lr: Tensor,
                           log_keep: Tensor, log_momentum: Tensor, lr_mod: Tensor,
                           operand_dtype: Optional[torch.dtype] = None,
                           backward: str = 'autograd') -> Tuple[MemoryWeights, Tensor]:
        """W_0 .. W_U, each chunk's gradient taken at the previous state, and
        a_t (H, B, U + 1). Keys and values (H, B, U, L, hd). The gradients at
        each image's own state are PyTorch's for every implementation
        (``backward`` as the plan's)."""
        h, b, u, L, hd = keys.shape
        weights = self.initial_state.map(
            lambda t: t[:, None].expand(h, b, *t.shape[1:]))
        history: List[MemoryWeights] = [weights]
        keep, eta = log_keep.exp(), log_momentum.exp()
        # S_0 = 0 explicitly, so that eta_1 is in the graph (with zero gradient)
        # exactly as in the parallel scan.
        momentum = [torch.zeros(()).to(w) for w in weights]
        for t in range(u):
            grads = chunk_grads(
                weights.map(lambda w: w.reshape(h * b, *w.shape[2:])),
                keys[:, :, t].reshape(h * b, 1, L, hd),
                values[:, :, t].reshape(h * b, 1, L, hd),
                token_lr[:, :, t].reshape(h * b, 1, L), operand_dtype, backward=backward,
                gelu_approximate=self.gelu_approximate)
            surprise = [-_bcast(m[..., t], g) * g.reshape(h, b, *g.shape[2:])
                        for m, g in zip(lr_mod, grads)]
            momentum = [_bcast(eta[..., t], s) * s_prev + s
                        for s_prev, s in zip(momentum, surprise)]
            weights = MemoryWeights(*(
                _bcast(keep[..., t], w) * w + s for w, s in zip(weights, momentum)))
            history.append(weights)
        states = MemoryWeights(*(torch.stack(ts, dim=2) for ts in zip(*history)))
        return states, decay_carry(log_keep)

    def working_set_bytes(self, num_tokens: int, element_size: int = 4,
                          plan: Optional[MemoryPlan] = None) -> int:
        """Estimated peak bytes of one image's inference at ``num_tokens``
        on ``plan``'s path: through every kernel (``_kernels_working_set``)
        where the plan takes them all, else (and without a plan) the PyTorch
        path's, which bounds the others: the largest of its phases, each counting the
        tensors alive together, as ``testing.LiveTensorBytes`` measures them:
        the projections (with the pool's temporaries), the write (queries,
        keys, values and step sizes kept; its (T, d)-wide and two (T, 4d)
        tensors, then the chunks' gradients), the scan (gradients and
        states), the read (states and two (N, 4d) tensors). 10% on top
        covers 16-bit operand copies. Per image: constants (the folded
        projection weights) do not grow with the batch."""
        if plan is not None and plan.scan == 'triton' and plan.projections == 'triton':
            return self._kernels_working_set(num_tokens, plan)
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

    def _kernels_working_set(self, num_tokens: int, plan: MemoryPlan) -> int:
        """``working_set_bytes`` through every kernel: the largest of the
        projections' results, the gradients' rows pass (its scratch beside
        them), their weights' pass (keys, values and step sizes gone but
        float32 keys), the scan (each gradient freed once scanned) and the
        read; the queries throughout. 10% on top, as the PyTorch path's."""
        d, h, n, L = self.dim, self.heads, num_tokens, self.chunk_size
        u = self.num_updates(n)
        queries = out = 4 * d * n
        if u == 0:
            return int(1.1 * (queries + out))
        written = u * L
        operand = (plan.operand_dtype or torch.float32).itemsize
        projections = (2 * d + h) * written * 4 + 2 * d * u * 4
        # the gradient at the MLP's output and, with 16-bit operands, the keys' copy
        scratch = (2 if operand < 4 else 1) * d * written * operand
        float32_keys = d * written * 4 if operand == 4 else 0
        weights = 4 * d * d // h  # one chunk's w1 (or w2), all heads
        with torch.no_grad():  # inference's dtypes
            grads_dtype, state_dtype = _grads_dtype(plan), _scan_state_dtypes(plan)[0]
        grads = u * weights * (grads_dtype or torch.float32).itemsize + d * u * 4
        states = (u + 1) * (weights * state_dtype.itemsize + d * 4)
        phases = (projections, projections + scratch, float32_keys + scratch + 2 * grads,
                  grads + states + max(grads, states), 2 * states + out)
        return int(1.1 * (queries + max(phases)))

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
    def project(self, x: Tensor, num_updates: int, plan: MemoryPlan) -> MemoryProjections:
        """Queries of every token of ``x`` (B, N, d); keys, values, token
        learning rates and gates of its first ``num_updates`` chunks.

        ``plan.projections`` says how: 'torch' folds the two RMSNorms'
        weights into one product of every projection, computed at run time
        from the unchanged parameters (the same maths in fewer kernels; it
        trains through its closed-form backward where ``plan.backward`` says
        so); 'triton' computes that in one kernel, and one for its backward,
        and the gates in one more (``memory_ops.gates``); 'layers' calls
        each layer.

        Args:
            x: (B, N, d) in the compute dtype.
            num_updates: the chunks that write.
            plan: the call's plan (``projections``, ``operand_dtype``,
                ``decomposed_read``: its queries exact, ``backward``).
        """
        if plan.projections == 'layers':
            return self._project_layers(x, num_updates)
        out = project(x, self.projection_weights(x.dtype), num_updates, self.chunk_size,
                      self.max_lr, plan.operand_dtype, exact_queries=plan.decomposed_read,
                      implementation=plan.projections, backward=plan.backward)
        if num_updates == 0:
            return MemoryProjections(out.queries)
        gates = chunk_gates(out.summary, self.gate_weights(out.summary.dtype),
                            implementation=plan.projections)
        return MemoryProjections(out.queries, out.keys, out.values, out.token_lr, *gates)

    def _project_layers(self, x: Tensor, u: int) -> MemoryProjections:
        """``project`` by calling each layer (the reference of the folded one)."""
        queries = self._split_heads(self.to_queries(self.retrieve_norm(x)))
        queries = self.query_norm(queries) * (1.0 + self.query_gamma[:, None, None])
        if u == 0:
            return MemoryProjections(queries)
        b, L = x.shape[0], self.chunk_size
        s = self.store_norm(x[:, :u * L])
        keys = self._split_heads(self.to_keys(s))
        keys = self.key_norm(keys) * (1.0 + self.key_gamma[:, None, None])
        values = self._split_heads(self.to_values(s))
        token_lr = self.max_lr * torch.sigmoid(self.to_token_lr(s)).permute(2, 0, 1)
        summary = self.pool(s.reshape(b, u, L, self.dim))  # (B, U, d)
        gates = torch.cat([self.to_decay(summary), self.to_momentum(summary),
                           self.to_lr_modulation(summary)], dim=-1)
        return MemoryProjections(queries, keys, values, token_lr,
                                 *gates_from_logits(gates, self.heads))

    def projection_weights(self, dtype: torch.dtype) -> ProjectionWeights:
        """The projection layers' parameters for ``memory_ops.project``, in
        ``dtype`` (FSDP's mixed precision may hand 16-bit ones; ``to`` returns
        a tensor already in ``dtype`` itself)."""
        return ProjectionWeights(*(t.to(dtype) for t in (
            self.retrieve_norm.weight, self.store_norm.weight, self.to_queries.weight,
            self.to_keys.weight, self.to_values.weight, self.pool.to_logits.weight,
            self.pool.to_logits.bias, self.to_token_lr.weight, self.to_token_lr.bias,
            self.query_gamma, self.key_gamma)))

    def gate_weights(self, dtype: torch.dtype) -> GateWeights:
        """The gate layers' parameters for ``memory_ops.gates``, in ``dtype``
        (as ``projection_weights``)."""
        return GateWeights(*(t.to(dtype) for layer in (
            self.to_decay, self.to_momentum, self.to_lr_modulation)
            for t in (layer.weight, layer.bias)))


def plain_layers(*layers: Tuple[nn.Module, type]) -> bool:
    """Each ``(layer, cls)``: the layer is exactly a ``cls``, not wrapped or
    sharded (FSDP), and no forward hook, its own or global (a FLOP counter's,
    a user's), waits to see it called. Only then may a caller compute with
    its weights directly instead of calling it."""
    # torch has no public getter of forward hooks, global or per module: only register_*
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    for layer, cls in layers:
        if type(layer) is not cls or layer._forward_hooks or layer._forward_pre_hooks:
            return False
        if _has_dtensor(layer):
            return False
    return True


def _has_dtensor(module: nn.Module) -> bool:
    """A parameter of the module or its submodules is a DTensor (sharded)."""
    # plain loops over the modules' own dicts: ``parameters()`` costs too much on every
    # forward (docs/notes/investigations.md#smaller-decisions-in-the-model)
    for p in module._parameters.values():
        if isinstance(p, DTensor):
            return True
    for child in module._modules.values():
        if child is not None and _has_dtensor(child):
            return True
    return False


def _functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform is running (torch's own check; False
    where this torch has none)."""
    active = getattr(torch._C, '_are_functorch_transforms_active', None)
    return bool(active is not None and active())


def _traced() -> bool:
    """Inside torch.compile or torch.export: such graphs keep one eager-equivalent path."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


# the operand dtypes whose scan states and chunk gradients train in that dtype:
# bfloat16 has float32's range, where a loss-scaled cotangent of a whole state may
# overflow float16
TRAINING_STATE_DTYPES = (torch.bfloat16, )


def _scan_state_dtypes(plan: MemoryPlan) -> Tuple[torch.dtype, torch.dtype, torch.dtype]:
    """The scan kernel's state dtypes of w1, w2 and g: w1's and w2's, read by
    products only, in their operand dtype (the rounding the products gave
    them anyway), and so their cotangents; in training float32 but for
    ``TRAINING_STATE_DTYPES``."""
    operands = plan.operand_dtype or torch.float32
    if torch.is_grad_enabled() and operands not in TRAINING_STATE_DTYPES:
        operands = torch.float32
    return operands, operands, torch.float32


def _grads_dtype(plan: MemoryPlan) -> Optional[torch.dtype]:
    """The dtype the kernels write w1's and w2's chunk gradients in: their
    scan states' (``_scan_state_dtypes``) where the scan kernel reads them,
    but float32 for float16 at a decomposed read's small max_lr (most
    updates below its normal range); None (float32) elsewhere."""
    if (plan.implementation == 'triton' and plan.scan == 'triton' and
            not (plan.decomposed_read and plan.operand_dtype == torch.float16)):
        return _scan_state_dtypes(plan)[0]
    return None


def _per_image_chunks(proj: MemoryProjections) -> Tuple[Tensor, Tensor, Tensor]:
    """Keys, values (H, B, U, L, hd) and step sizes (H, B, U, L): views of
    the projections, each image's written chunks where they lie."""
    u = proj.log_keep.shape[-1]
    L = proj.keys.shape[2] // u
    return (proj.keys.unflatten(2, (u, L)), proj.values.unflatten(2, (u, L)),
            proj.token_lr.unflatten(2, (u, L)))


def _bcast(coef: Tensor, like: Tensor) -> Tensor:
    """Append singleton dims to ``coef`` so that it broadcasts against ``like``."""
    return coef.reshape(*coef.shape, *([1] * (like.dim() - coef.dim())))
