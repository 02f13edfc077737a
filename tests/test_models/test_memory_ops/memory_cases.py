"""What the memory ops' tests share: inputs, float64 references, tolerances, and
the interpreter runs (the functions ``*_results``, each run in a subprocess
with TRITON_INTERPRET=1 by ``tests/interpreted.py``; this module's
``__main__`` runs one).
"""
import contextlib
import itertools
import os
from typing import Dict, List, Optional, Tuple
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_grads_torch,
                                                  chunk_grads_triton, chunk_read_naive,
                                                  chunk_read_torch, chunk_read_triton, kernels,
                                                  read_torch, read_triton)
from convneur_mm.models.layers.memory_ops.chunk_grads import chunk_grads_triton_staged
from convneur_mm.models.layers.memory_ops.gates import (GateWeights, chunk_gates_naive,
                                                        chunk_gates_triton)
from convneur_mm.models.layers.memory_ops.kernels import launcher, tiles as kernel_tiles
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested
from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile
from convneur_mm.models.layers.memory_ops.project import (ProjectionWeights, fold, project_naive,
                                                          project_triton, projection_shapes)
from convneur_mm.models.layers.memory_ops.scan import scan_states_triton
from convneur_mm.models.layers.neural_memory import NeuralMemory
from convneur_mm.testing.errors import least, worst

from ... import interpreted as interpreted_runs
from ...triton_bounds import checked_accesses, nan_filled_allocations


def _run_interpreted(what: str) -> dict:
    """This module's function ``what`` in a subprocess with TRITON_INTERPRET=1;
    its JSON result (the module prints it when run as a script)."""
    return interpreted_runs.result(what, __name__)

F32_TOL = 1e-5
F16_EMULATED_TOL = 5e-5
F16_TOL = 1e-2
BF16_TOL = 3e-2


def _rel_err(out, ref) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _norm_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _weights(groups: int, d: int, gen: torch.Generator) -> MemoryWeights:
    hidden = 4 * d
    return MemoryWeights(torch.randn(groups, d, hidden, generator=gen) * d ** -0.5,
                         torch.randn(groups, hidden, d, generator=gen) * hidden ** -0.5,
                         torch.randn(groups, d, generator=gen) * 0.1)


def _write_inputs(groups: int, chunks: int, length: int, d: int, max_lr: float, seed: int):
    """Weights, keys (a strided view: the kernels take any strides), values, lr."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(groups, length, chunks, d, generator=gen).transpose(1, 2)
    values = torch.randn(groups, chunks, length, d, generator=gen)
    token_lr = max_lr * torch.rand(groups, chunks, length, generator=gen)
    return _weights(groups, d, gen), keys, values, token_lr


def _grads64(w: MemoryWeights, keys, values, token_lr, rnd):
    """The kernels' gradient maths in float64, ``rnd`` applied to every
    product operand where the kernels cast to their operand dtype (the
    identity gives the exact gradient). The kernels round the gradient at the
    MLP's output before its constant factor 2 / d, and so does this."""
    w1, w2, g = (t.double() for t in w)
    k, v, lr = keys.double(), values.double(), token_lr.double()
    d = k.shape[-1]
    w1r, w2r = rnd(w1)[:, None], rnd(w2)[:, None]
    pre = rnd(k) @ w1r
    act = F.gelu(pre)
    y = rnd(act) @ w2r
    normed = F.layer_norm(y, (d,), eps=1e-5)
    rstd = torch.rsqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
    scale = 1 + g[:, None, None]
    d_out = (k + normed * scale - v) * lr[..., None]
    d_normed = d_out * scale
    d_hidden = rstd * (d_normed - d_normed.mean(-1, keepdim=True) -
                       normed * (d_normed * normed).mean(-1, keepdim=True))
    d_pre = torch.ops.aten.gelu_backward(rnd(d_hidden) @ w2r.transpose(-1, -2), pre)
    return MemoryWeights(rnd(k).transpose(-1, -2) @ rnd(d_pre) * (2 / d),
                         rnd(act).transpose(-1, -2) @ rnd(d_hidden) * (2 / d),
                         (d_out * normed).sum(-2) * (2 / d))


def _forward64(w: MemoryWeights, x, rnd):
    """``memory_forward`` in float64 with ``rnd`` at the kernels' operand casts."""
    w1, w2, g = (t.double() for t in w)
    x = x.double()
    hidden = rnd(F.gelu(rnd(x) @ rnd(w1))) @ rnd(w2)
    return x + F.layer_norm(hidden, hidden.shape[-1:], eps=1e-5) * (1 + g[:, None])


def _half(t):
    return t.half().double()


def _grads_errors(got: MemoryWeights, w, keys, values, token_lr) -> dict:
    exact = chunk_grads_torch(w.map(torch.Tensor.double), keys.double(), values.double(),
                         token_lr.double())
    half = _grads64(w, keys, values, token_lr, _half)
    return dict(exact=worst(_rel_err(a, b) for a, b in zip(got, exact)),
                emulated=worst(_norm_err(a, b) for a, b in zip(got, half)),
                shapes=[list(t.shape) for t in got])


def _decomposed_results(gen: torch.Generator, device: str = 'cpu',
                        dtypes=(('f32', torch.float32), ('f16', torch.float16))) -> dict:
    """A read of states ``a * W_0 + dW`` with dW 0.2% of them (what max_lr
    1e-3 makes): the update's contribution (the output minus the output of
    ``a * W_0`` alone), 16-bit operands with and without the decomposition."""
    heads, per_head, m, d = 2, 3, 20, 24
    tiles = dict(block_rows=32, block_hidden=32)  # fewer programs for the interpreter
    groups = heads * per_head
    base = _weights(heads, d, gen)
    delta = _weights(groups, d, gen).map(lambda t: t * 2e-3)
    carry = 0.5 + 0.5 * torch.rand(groups, generator=gen)
    x = torch.randn(groups, m, d, generator=gen)
    scaled = base.map(lambda t: t.repeat_interleave(per_head, 0) *
                      carry.view(-1, *[1] * (t.dim() - 1)))
    full = MemoryWeights(scaled.w1 + delta.w1, scaled.w2 + delta.w2, delta.g)
    exact = read_torch(full.map(torch.Tensor.double), x.double())
    update = exact - read_torch(MemoryWeights(scaled.w1, scaled.w2, delta.g).map(
        torch.Tensor.double), x.double())
    results = {}
    on = lambda t: t.to(device)  # noqa: E731
    for tag, dtype in dtypes:
        out = read_triton(delta.map(on), on(x), dtype, base=base.map(on),
                                                  carry=on(carry), **tiles).cpu()
        naive = read_triton(full.map(on), on(x), dtype, **tiles).cpu()
        results[f'decomposed_{tag}'] = dict(
            exact=_rel_err(out, exact), update=_norm_err(out - exact + update, update),
            naive_update=_norm_err(naive - exact + update, update))
    # the same through the chunk read: (H, B, C) states of 16-token chunks
    states = MemoryWeights(*(t.view(heads, per_head, 1, *t.shape[1:]) for t in delta))
    queries = x[:, :16].reshape(heads, per_head, 16, d)
    out = chunk_read_triton(states.map(on), on(queries), 16, torch.float32,
                                           base=base.map(on),
                                           carry=on(carry.view(heads, per_head, 1)),
                                           **tiles).cpu()
    ref = exact[:, :16].reshape(heads, per_head, 16, d).permute(1, 2, 0, 3).reshape(
        per_head, 16, heads * d)
    results['decomposed_read_chunks_f32'] = dict(exact=_rel_err(out, ref))
    return results


# the chunk gradients' two passes (the default), and one program per chunk
LAYOUTS = [('', contextlib.nullcontext),
           ('_one_program', lambda: kernel_tiles.forced_tiles('grads_chunk'))]


def interpreter_results() -> dict:
    """Every interpreter case: {name: errors}. Runs in the subprocess."""
    assert os.environ.get('TRITON_INTERPRET') == '1'
    results = {'interpreter_bf16': dict(
        reason=kernels.unavailable_reason('cpu', operand_dtype=torch.bfloat16),
        float32_reason=kernels.unavailable_reason('cpu', 16, torch.float32))}
    dtypes = {'f32': torch.float32, 'f16': torch.float16}
    # (groups, chunks, L, d, max_lr, blocks): d = 24 and 20 pad to 32, their
    # hidden widths 96 and 80 leave a masked hidden block of 64, and L = 24
    # or 8 leaves a masked row block
    write_cases = {'d24_L24_blocks16': (2, 3, 24, 24, 1.0, dict(block_rows=16, block_hidden=64)),
                   'd16_L8_default_blocks': (1, 2, 8, 16, 1.0, {}),
                   'd20_L24_small_lr': (2, 2, 24, 20, 1e-3, dict(block_rows=16)),
                   # the weights' pass: one 32-row block, then 8 rows in a 16-row step
                   'd16_L40_blocks32': (1, 3, 40, 16, 1.0, dict(block_rows=32))}
    with torch.no_grad():
        for name, (groups, chunks, length, d, max_lr, blocks) in write_cases.items():
            w, keys, values, token_lr = _write_inputs(groups, chunks, length, d, max_lr, seed=d)
            for (tag, dtype), (layout, chosen) in itertools.product(dtypes.items(), LAYOUTS):
                with chosen(), launcher.observing_launches() as launches:
                    got = chunk_grads_triton(w, keys, values, token_lr, dtype, **blocks)
                results[f'grads{layout}_{tag}_{name}'] = dict(
                    _grads_errors(got, w, keys, values, token_lr),
                    kernels=[x.kernel.__name__ for x in launches])

        gen = torch.Generator().manual_seed(0)
        # the projections' views of B images, cut to their U written chunks:
        # (G, B, U, L, d) in the kernels equals their (G, B * U, L, d) copy
        groups, images, chunks, length, n, d = 2, 3, 2, 8, 21, 16
        proj = torch.randn(images, n, groups, 2 * d, generator=gen)
        written = proj[:, :chunks * length].permute(2, 0, 1, 3).unflatten(2, (chunks, length))
        keys, values = written[..., :d], written[..., d:]
        token_lr = torch.rand(images, n, groups, generator=gen)[:, :chunks * length].permute(
            2, 0, 1).unflatten(2, (chunks, length))
        w = _weights(groups, d, gen)
        views = chunk_grads_triton(w, keys, values, token_lr, torch.float32)
        copies = chunk_grads_triton(
            w, keys.reshape(groups, -1, length, d), values.reshape(groups, -1, length, d),
            token_lr.reshape(groups, -1, length), torch.float32)
        results['grads_per_image_views'] = dict(
            difference=worst((a - b).abs().max().item() for a, b in zip(views, copies)),
            shapes=[list(t.shape) for t in views])
        # the rows pass over each image's rows in 16-row blocks, two of them meeting
        # two of an image's 24-row chunks
        length, d = 24, 16
        proj = torch.randn(images, chunks * length + 3, groups, 2 * d + 1, generator=gen)
        written = proj[:, :chunks * length].permute(2, 0, 1, 3).unflatten(2, (chunks, length))
        keys, values, token_lr = written[..., :d], written[..., d:2 * d], written[..., 2 * d]
        token_lr = token_lr.sigmoid()
        w = _weights(groups, d, gen)
        for (tag, dtype), (layout, chosen) in itertools.product(dtypes.items(), LAYOUTS):
            with chosen():
                got = chunk_grads_triton(w, keys, values, token_lr, dtype, block_rows=16)
            results[f'grads{layout}_{tag}_per_image_rows'] = _grads_errors(
                got, w, *(t.flatten(1, 2) for t in (keys, values, token_lr)))
        # inference's two calls: the operator's launches, the operator's results
        for tag, dtype in dtypes.items():
            whole = chunk_grads_triton(w, keys, values, token_lr, dtype, grads_dtype=dtype)
            staged = chunk_grads_triton_staged(w, keys, values, token_lr, dtype,
                                               grads_dtype=dtype)()
            results[f'grads_staged_{tag}'] = dict(
                equal=[torch.equal(a, b) for a, b in zip(whole, staged)],
                dtypes=[str(t.dtype) for t in staged])

        w, x = _weights(2, 24, gen), torch.randn(2, 40, 24, generator=gen)
        # 40 rows in 16-row blocks; in one 32-row block and then 8 in a 16-row one
        for rows in (16, 32):
            for tag, dtype in dtypes.items():
                got = read_triton(w, x, dtype, block_rows=rows)
                results[f'forward_{tag}_d24' + ('' if rows == 16 else f'_rows{rows}')] = dict(
                    exact=_rel_err(got, read_torch(w.map(torch.Tensor.double), x.double())),
                    emulated=_norm_err(got, _forward64(w, x, _half)),
                    shapes=[list(got.shape)])

        results.update(_decomposed_results(gen))

        # chunk t of each (head, image) reads its own state; 40 tokens in
        # chunks of 16: the last chunk is partial; output heads merged
        heads, batch, chunks, length, n, d = 2, 2, 3, 16, 40, 16
        states = _weights(heads * batch * chunks, d, gen).map(
            lambda t: t.view(heads, batch, chunks, *t.shape[1:]))
        queries = torch.randn(batch, n, heads, d, generator=gen).permute(2, 0, 1, 3)
        ref = chunk_read_naive(states.map(torch.Tensor.double), queries.double(), length)
        for tag, dtype in dtypes.items():
            got = chunk_read_triton(states, queries, length, dtype)
            results[f'read_chunks_{tag}'] = dict(exact=_rel_err(got, ref),
                                                 shapes=[list(got.shape)])
        # a single-chunk read of more than 4096 rows per group is cut into
        # pseudo-chunks of 4096 (read_triton): the tail rows must be read too
        w, x = _weights(2, 16, gen), torch.randn(2, 4096 + 40, 16, generator=gen)
        out = read_triton(w, x, torch.float32, block_rows=64)
        results['read_past_4096_rows'] = dict(
            exact=_rel_err(out, read_torch(w.map(torch.Tensor.double), x.double())),
            finite=bool(torch.isfinite(out).all()))
        results.update(projection_results(gen))
        results.update(scan_results(gen))
        results.update(gates_results(gen))
        results.update(fold_results(gen))
    results['modules'] = module_results()  # one subprocess: imports are most of its time
    return results


def fold_results(gen: torch.Generator) -> dict:
    """``fold_triton`` against ``fold`` and its cast, bit for bit, at three
    widths (M4's 160 too), the store norm and the keys as strided views; and
    the projections at M4's width through either fold (``fold_either_way``)."""
    from convneur_mm.models.layers.memory_ops.project.triton import fold_triton
    results = {}
    for d, heads in ((16, 1), (40, 2), (160, 4)):
        w = ProjectionWeights(*(torch.randn(*shape, generator=gen)
                                for shape in projection_shapes(d, heads)))
        w = w._replace(store_norm=torch.stack([w.store_norm, torch.zeros(d)], dim=1)[:, 0],
                       keys=w.keys.t().contiguous().t())
        want = fold(w)
        for tag, dtype in (('f32', torch.float32), ('f16', torch.float16)):
            # every access bounds-checked, new tensors NaN: an unwritten entry fails ``equal``
            with nan_filled_allocations(), checked_accesses():
                got = fold_triton(w, dtype)
            results[f'fold_{tag}_d{d}'] = dict(
                dtypes=[str(t.dtype) for t in got],
                equal=[torch.equal(got.weight, want.weight.to(dtype)),
                       torch.equal(got.bias, want.bias), torch.equal(got.gamma, want.gamma)])
    # the projections through either fold (M4's width, the last): with autograd
    # ``fold``, without the kernel's
    x = torch.randn(2, 40, d, generator=gen)
    same = {}
    for tag, exact in (('f16', False), ('f16_exact_queries', True)):
        with torch.enable_grad():
            trained = project_triton(x, ProjectionWeights(*_leaves(list(w))), 2, 16, 0.5,
                                     torch.float16, exact_queries=exact)
        with torch.no_grad():
            inferred = project_triton(x, w, 2, 16, 0.5, torch.float16, exact_queries=exact)
        same[tag] = all(torch.equal(a.detach(), b) for a, b in zip(trained, inferred))
    results['fold_either_way'] = same
    return results


# (images, chunks, d, heads): one chunk; several row blocks with a partial last one
# and a width past one 64-feature step; M4's width at four heads
GATES_CASES = {'b1_u1_d16_h1': (1, 1, 16, 1), 'b3_u7_d80_h2': (3, 7, 80, 2),
               'b2_u15_d160_h4': (2, 15, 160, 4)}


def gates_errors(summary: torch.Tensor, weights: GateWeights, gen: torch.Generator,
                 device: str = 'cpu', reference=chunk_gates_naive) -> dict:
    """``chunk_gates_triton`` on ``device`` against ``reference`` in
    float64, forward and backward (random cotangents from ``gen``): each
    output's and gradient's relative error, the outputs' shapes and whether
    they are contiguous. Past logits of about 30 the naive form's
    log(1 - sigmoid) loses float64's digits (-inf past 37): there the
    reference is ``chunk_gates_torch``'s stable form."""
    leaves = _leaves([summary, *weights], device)
    got = chunk_gates_triton(leaves[0], GateWeights(*leaves[1:]))
    exact_leaves = _leaves([t.double() for t in (summary, *weights)])
    exact = reference(exact_leaves[0], GateWeights(*exact_leaves[1:]))
    cotangents = [torch.randn(t.shape, generator=gen) for t in got]
    grads = torch.autograd.grad(got, leaves, [c.to(device) for c in cotangents])
    exact_grads = torch.autograd.grad(exact, exact_leaves, [c.double() for c in cotangents])
    return dict(forward=[_rel_err(a.cpu(), e) for a, e in zip(got, exact)],
                backward=[_rel_err(a.cpu(), e) for a, e in zip(grads, exact_grads)],
                shapes=[list(t.shape) for t in got],
                contiguous=all(t.is_contiguous() for t in got))


def _gates_cases(gen: torch.Generator) -> dict:
    """``gates_results``' ``GATES_CASES`` (``gates_errors``)."""
    results = {}
    for name, (b, u, d, heads) in GATES_CASES.items():
        summary = torch.randn(b, d, u, generator=gen).transpose(1, 2)
        results[f'gates_{name}'] = gates_errors(summary, _gate_args(heads, d, gen), gen)
    return results


def gates_results(gen: torch.Generator) -> dict:
    """``chunk_gates_triton`` against ``chunk_gates_naive`` in float64,
    forward and backward, on strided summaries: the worst relative error of
    each output and gradient; and at logits of +-40, where the naive form's
    log(1 - sigmoid) is -inf, against the stable form."""
    results = {}
    # every access bounds-checked, new tensors NaN: every output written
    with torch.enable_grad(), nan_filled_allocations(), checked_accesses():
        results.update(_gates_cases(gen))
    # logits -40 and +40 for each gate: exp(-40) is below float32's 1 + eps
    weights = GateWeights(*(torch.zeros(rows, *cols) for rows in (1, 1, 3) for cols in ((16,), ())))
    summary = torch.zeros(2, 1, 16)
    summary[:, 0, 0] = torch.tensor([-40.0, 40.0])
    for w in (weights.decay, weights.momentum, weights.lr_modulation):
        w[:, 0] = 1.0
    with torch.no_grad():
        got = chunk_gates_triton(summary, weights)
    z = summary[:, 0, 0].double()
    stable = [F.logsigmoid(-z), F.logsigmoid(z), torch.sigmoid(z)]
    # each element against its own size: log(sigmoid(40)) is -4.2e-18
    results['gates_extreme_logits'] = dict(elementwise=worst(
        ((a.double() - e).abs() / e.abs()).max().item()
        for a, e in zip((got.log_keep[0, :, 0], got.log_momentum[0, :, 0],
                         got.lr_mod[0, 0, :, 0]), stable)))
    return results


def scan_results(gen: torch.Generator) -> dict:
    """``scan_states_triton`` against the recursion in float64: three tensors
    (one past a block of 1024 entries, one from zero), strided gradients,
    16-bit states against the float32 ones cast."""
    from convneur_mm.models.layers.memory_ops.scan import scan_states_naive, scan_states_triton
    n, u, widths = 3, 5, (40, 1100, 7)
    grads = [torch.randn(p, n, u, generator=gen).permute(1, 2, 0) for p in widths]
    lr_mod = torch.rand(3, n, u, generator=gen)
    log_keep, log_momentum = F.logsigmoid(torch.randn(2, n, u, generator=gen) + 2)
    initial = [torch.randn(n, p, generator=gen) for p in widths[:2]] + [None]
    ref = scan_states_naive([g.double() for g in grads], lr_mod.double(), log_keep.double(),
                            log_momentum.double(),
                            [None if w is None else w.double() for w in initial])
    got = scan_states_triton(list(grads), lr_mod, log_keep, log_momentum, initial)
    half = scan_states_triton(list(grads), lr_mod, log_keep, log_momentum, initial,
                              state_dtypes=[torch.float16, torch.float16, torch.float32])
    results = {'scan': dict(
        exact=worst(_rel_err(a, b) for a, b in zip(got, ref)),
        shapes=[list(t.shape) for t in got],
        dtypes=[str(t.dtype) for t in half],
        cast_difference=max((a.to(b.dtype) != b).sum().item() for a, b in zip(got, half)))}

    # the backward kernel against autograd through the float64 recursion,
    # every input's gradient, at random cotangents of every state
    def gradients(dtype, scan):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_()
                  for t in (*grads, lr_mod, log_keep, log_momentum, *initial[:2])]
        with torch.enable_grad():
            states = scan(list(leaves[:3]), *leaves[3:6], [*leaves[6:], None])
            sum((s * c.to(dtype)).sum() for s, c in zip(states, cotangents)).backward()
        return [t.grad for t in leaves]

    cotangents = [torch.randn(n, u + 1, p, generator=gen) for p in widths]
    exact = gradients(torch.float64, scan_states_naive)
    kernel = gradients(torch.float32, scan_states_triton)
    results['scan_backward'] = dict(exact=worst(_rel_err(a, b) for a, b in zip(kernel, exact)),
                                    count=sum(a is not None for a in kernel))
    # bfloat16 training's (in float16): two gradients and so their states and
    # cotangents 16-bit; float64 takes the same rounded gradients and cotangents
    full = grads, cotangents
    grads, cotangents = ([t.half() if i < 2 else t for i, t in enumerate(ts)] for ts in full)
    exact = gradients(torch.float64, scan_states_naive)
    leaves = [t.detach().clone().requires_grad_()
              for t in (*grads, lr_mod, log_keep, log_momentum, *initial[:2])]
    with torch.enable_grad():
        states = scan_states_triton(list(leaves[:3]), *leaves[3:6], [*leaves[6:], None],
                                    state_dtypes=[torch.float16, torch.float16, torch.float32])
        torch.autograd.backward(states, cotangents)
    results['scan_backward_16_bit'] = dict(
        exact=[_rel_err(a.grad, b) for a, b in zip(leaves, exact)],
        dtypes=[str(t.grad.dtype) for t in leaves])
    grads, cotangents = full
    # updates 1e-4 of W_0: the momenta must not come from differences of states
    lr_mod, initial = lr_mod * 1e-4, [w * 10 for w in initial[:2]] + [None]
    exact = gradients(torch.float64, scan_states_naive)
    kernel = gradients(torch.float32, scan_states_triton)
    results['scan_backward_small_updates'] = dict(
        exact=worst(_rel_err(a, b) for a, b in zip(kernel, exact)))
    return results


# (batch, tokens, d, heads, L, U, block_rows, block_features): a partial last
# chunk; two heads of a padded width (12 -> 16); a masked row block; no
# write; products over 16-feature steps with a masked last one (one block of
# 160 columns' path)
PROJECTION_CASES = {'heads2_d24': (2, 20, 24, 2, 8, 2, 16, None),
                    'd20_L24': (2, 50, 20, 1, 24, 2, None, None),
                    'one_chunk': (1, 6, 16, 1, 8, 0, None, None),
                    'heads2_d40_steps16': (2, 20, 40, 2, 8, 2, 16, 16),
                    # rows in two column blocks (``kernel_tiles.column_blocks``, forced): 40
                    # as 32 + 16, the head's columns too; 16-feature steps (M4's path),
                    # two heads of 20 in one block each; 80 as 64 + 16 (float16: whole
                    # rows, float32: 32-feature steps), two heads of 40 as 32 + 16 and
                    # five of 16 in one block each
                    'd40_split': (2, 20, 40, 1, 8, 2, 16, None),
                    'heads2_d40_split_steps16': (2, 20, 40, 2, 8, 2, 16, 16),
                    'heads2_d80_split': (1, 20, 80, 2, 8, 2, 16, None),
                    'heads5_d80_split': (1, 20, 80, 5, 8, 2, 16, None)}
# the cases that also run with exact queries (``project_triton``'s ``exact_queries``):
# one block, 16-feature steps, two column blocks
EXACT_QUERY_CASES = ('heads2_d24', 'heads2_d40_steps16', 'heads2_d80_split')
# the launches' (BD, BE, BHD, BHE) where a case splits its rows
PROJECTION_SPLITS = {'d40_split': (32, 16, 32, 16), 'heads2_d40_split_steps16': (32, 16, 32, 0),
                     'heads2_d80_split': (64, 16, 32, 16), 'heads5_d80_split': (64, 16, 16, 0)}


def projection_results(gen: torch.Generator) -> dict:
    """``project_triton`` against ``project_naive`` in float64 (each layer in
    turn: also a check of the folding), x a strided view."""
    from convneur_mm.models.layers.memory_ops.project import (ProjectionWeights, project_naive,
                                                              project_triton, projection_shapes)
    results = {}
    for name, (b, n, d, heads, length, u, block_rows, steps) in PROJECTION_CASES.items():
        weights = ProjectionWeights(*(torch.randn(*shape, generator=gen) * 0.5
                                      for shape in projection_shapes(d, heads)))
        if name == 'd20_L24':  # any strides: the store norm's weight as a strided view
            weights = weights._replace(store_norm=torch.stack(
                [weights.store_norm, torch.zeros(d)], dim=1)[:, 0])
        x = torch.randn(b, d, n, generator=gen).transpose(1, 2)
        ref = project_naive(x.double(), ProjectionWeights(*(t.double() for t in weights)),
                            u, length, 0.5)
        for tag, dtype in (('f32', torch.float32), ('f16', torch.float16)):
            with kernel_tiles.forced_tiles('project', split=int(name in PROJECTION_SPLITS)), \
                    launcher.observing_launches() as launches:
                got = project_triton(x, weights, u, length, 0.5, dtype, block_rows=block_rows,
                                     block_features=steps)
            results[f'project_{tag}_{name}'] = dict(
                exact=worst(_rel_err(g, r) for g, r in zip(got, ref) if r.numel()),
                queries=_rel_err(got.queries, ref.queries),
                shapes=[list(t.shape) for t in got],
                want=[list(t.shape) for t in ref],
                tiles=sorted({tuple(x.kwargs[k] for k in ('BD', 'BE', 'BHD', 'BHE'))
                              for x in _projection_launches(launches)}))
        if name in EXACT_QUERY_CASES:  # float32 queries beside float16 others
            with kernel_tiles.forced_tiles('project', split=int(name in PROJECTION_SPLITS)), \
                    launcher.observing_launches() as launches:
                got = project_triton(x, weights, u, length, 0.5, torch.float16,
                                     exact_queries=True, block_rows=block_rows,
                                     block_features=steps)
            results[f'project_exact_queries_{name}'] = dict(
                queries=_rel_err(got.queries, ref.queries),
                others=worst(_rel_err(g, r) for g, r in zip(got[1:], ref[1:]) if r.numel()),
                query_steps=sorted({x.kwargs['QBK'] for x in _projection_launches(launches)}))
    return results


def model_width_results() -> dict:
    """The kernels' default tiles at the models' memory widths (M1 80, M2 96,
    M3 128, M4 160) and L = 196, in the interpreter (seconds per case)."""
    results = {}
    with torch.no_grad():
        for d in (80, 96, 128, 160):
            w, keys, values, token_lr = _write_inputs(1, 2, 196, d, 1.0, seed=d)
            x = torch.randn(1, 196, d, generator=torch.Generator().manual_seed(d))
            exact = read_torch(w.map(torch.Tensor.double), x.double())
            for tag, dtype in (('f32', torch.float32), ('f16', torch.float16)):
                got = chunk_grads_triton(w, keys, values, token_lr, dtype)
                errors = _grads_errors(got, w, keys, values, token_lr)
                read = read_triton(w, x, dtype)
                errors['read'] = _rel_err(read, exact)
                results[f'{tag}_d{d}'] = errors
    return results


def module_results() -> dict:
    """``NeuralMemory(implementation='triton')`` against ``implementation='torch'`` and
    float64, end to end on the CPU in the interpreter: {case: errors}."""
    import copy

    from convneur_mm.models.layers import NeuralMemory
    cases = {  # 20 tokens in chunks of 8: two writes, a partial last chunk
        'two_heads': dict(dim=32, heads=2, chunk_size=8, tokens=20),
        'one_chunk': dict(dim=16, chunk_size=8, tokens=6),
        'sequential': dict(dim=16, chunk_size=8, tokens=20, update='sequential'),
        'decomposed_f16': dict(dim=16, chunk_size=8, tokens=20, max_lr=1e-3,
                               operand_dtype='float16'),
        # the chunk gradients, as their states, in float16 between the kernels
        'plain_f16': dict(dim=16, chunk_size=8, tokens=20, operand_dtype='float16'),
    }
    results = {}
    for name, cfg in cases.items():
        tokens = cfg.pop('tokens')
        torch.manual_seed(0)
        ref = NeuralMemory(**cfg, implementation='torch').eval()
        triton = copy.deepcopy(ref)
        triton.implementation = 'triton'
        exact = copy.deepcopy(ref).double()
        exact.operand_dtype = 'float32'
        x = torch.randn(2, tokens, cfg['dim'])
        with torch.no_grad():
            out = triton(x)
            results[name] = dict(vs_torch=_rel_err(out, ref(x).double()),
                                 exact=_rel_err(out, exact(x.double())))
    return results


def _inspect():
    """``benchmarks.kernels.inspect`` where this process can compile for a GPU ahead of
    time (triton ships ptxas), else a skip."""
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('this process runs Triton in its interpreter')
    from benchmarks.kernels import inspect
    try:
        inspect._triton()
    except RuntimeError as err:
        pytest.skip(str(err))
    return inspect


DTYPES = {'f32': torch.float32, 'f16': torch.float16}


def _leaves(tensors: List[torch.Tensor], device: str = 'cpu') -> List[torch.Tensor]:
    return [t.detach().to(device, copy=True).requires_grad_() for t in tensors]


def _grad_errors(names: List[str], got: List[torch.Tensor], exact: List[torch.Tensor]) -> dict:
    return {name: _rel_err(a.grad.cpu(), b.grad) for name, a, b in zip(names, got, exact)}


def _read_case(gen: torch.Generator, dtype: torch.dtype, decomposed: bool, m: int = 40,
               d: int = 24, tiles: dict = None, per_head: int = 3,
               gelu_approximate: str = 'none') -> dict:
    """One read, its outputs' cotangent random: every input's gradient
    against float64 autograd through ``read_torch``."""
    tiles = tiles or dict(block_rows=16, block_hidden=64)  # a masked hidden block of 96
    heads = 2
    groups = heads * per_head
    if decomposed:  # states a * W_0 + dW, dW 0.2% of them
        inputs = [*(t * 2e-3 for t in _weights(groups, d, gen)), *_weights(heads, d, gen)[:2],
                  0.5 + 0.5 * torch.rand(groups, generator=gen)]
        names = ['w1', 'w2', 'g', 'base_w1', 'base_w2', 'carry', 'x']
    else:
        inputs, names = list(_weights(groups, d, gen)), ['w1', 'w2', 'g', 'x']
    inputs.append(torch.randn(groups, m, d, generator=gen))
    cotangent = torch.randn(groups, m, d, generator=gen)

    def call(fn, tensors, operand_dtype, **kwargs):
        base = dict(base=MemoryWeights(tensors[3], tensors[4], None),
                    carry=tensors[5]) if decomposed else {}
        return fn(MemoryWeights(*tensors[:3]), tensors[-1], operand_dtype, **base, **kwargs)

    got, exact = _leaves(inputs), _leaves([t.double() for t in inputs])
    out = call(read_triton, got, dtype, **tiles, gelu_approximate=gelu_approximate)
    out.backward(cotangent)
    ref = call(read_torch, exact, None, gelu_approximate=gelu_approximate)
    ref.backward(cotangent.double())
    return dict(forward=_rel_err(out, ref.detach()), grads=_grad_errors(names, got, exact))


def _chunk_read_case(gen: torch.Generator, dtype: torch.dtype, decomposed: bool,
                     sizes: tuple = (2, 2, 3, 16, 40, 16), device: str = 'cpu',
                     state_dtype: torch.dtype = torch.float32) -> dict:
    """The chunk read (``sizes``: heads, batch, chunks, length, tokens, d; by
    default 40 tokens in chunks of 16, a partial last chunk), heads merged:
    every input's gradient, and the queries' in the merged layout; w1's and
    w2's states in ``state_dtype`` (float64's reference reads them rounded),
    and the dtypes of their gradients."""
    heads, batch, chunks, length, n, d = sizes
    lead = (heads, batch, chunks)
    states = [t.view(*lead, *t.shape[1:]) for t in _weights(heads * batch * chunks, d, gen)]
    states[:2] = [t.to(state_dtype) for t in states[:2]]
    inputs, names = states, ['w1', 'w2', 'g']
    if decomposed:
        inputs = [*(t * 1e-2 for t in states), *_weights(heads, d, gen)[:2],
                  torch.rand(*lead, generator=gen)]
        names = names + ['base_w1', 'base_w2', 'carry']
    queries = torch.randn(batch, n, heads, d, generator=gen).permute(2, 0, 1, 3)
    cotangent = torch.randn(batch, n, heads * d, generator=gen)

    def call(fn, tensors, operand_dtype):
        base = dict(base=MemoryWeights(tensors[3], tensors[4], None),
                    carry=tensors[5]) if decomposed else {}
        return fn(MemoryWeights(*tensors[:3]), tensors[-1], length, operand_dtype, **base)

    got = _leaves(inputs + [queries], device)
    exact = _leaves([t.double() for t in inputs + [queries]])
    out = call(chunk_read_triton, got, dtype)
    out.backward(cotangent.to(device))
    ref = call(chunk_read_torch, exact, None)
    ref.backward(cotangent.double())
    return dict(forward=_rel_err(out.cpu(), ref.detach()),
                grads=_grad_errors(names + ['queries'], got, exact),
                queries_grad_merged=got[-1].grad.permute(1, 2, 0, 3).is_contiguous(),
                grad_dtypes=[str(t.grad.dtype) for t in got[:2]])


def _chunk_grads_case(inputs: List[torch.Tensor], dtype: torch.dtype, tiles: dict,
                      seed: int = 1, device: str = 'cpu', gelu_approximate: str = 'none',
                      grads_dtype: Optional[torch.dtype] = None) -> dict:
    """The chunk gradients of (w1, w2, g, keys, values, token_lr), their
    outputs' cotangents random (in the outputs' dtypes): every input's
    gradient against float64 autograd through ``chunk_grads_torch`` (a
    double backward)."""
    gen = torch.Generator().manual_seed(seed)
    got, exact = _leaves(inputs, device), _leaves([t.double() for t in inputs])
    out = chunk_grads_triton(MemoryWeights(*got[:3]), *got[3:], dtype, **tiles,
                             gelu_approximate=gelu_approximate, grads_dtype=grads_dtype)
    cotangents = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in out]
    torch.autograd.backward(out, [t.to(device) for t in cotangents])
    ref = chunk_grads_torch(MemoryWeights(*exact[:3]), *exact[3:],
                            gelu_approximate=gelu_approximate)
    torch.autograd.backward(ref, [t.double() for t in cotangents])
    return dict(forward=worst(_rel_err(a.cpu(), b.detach()) for a, b in zip(out, ref)),
                grads=_grad_errors(['w1', 'w2', 'g', 'keys', 'values', 'token_lr'], got, exact),
                shapes=[list(t.grad.shape) for t in got[3:]],
                dtypes=[str(t.dtype) for t in out])


def _per_image_views(gen: torch.Generator) -> List[torch.Tensor]:
    """Keys, values and step sizes as the projections' views of B images'
    U written chunks, (G, B, U, L, d), and shared weights."""
    groups, images, chunks, length, n, d = 2, 3, 2, 8, 21, 16
    proj = torch.randn(images, n, groups, 2 * d, generator=gen)
    written = proj[:, :chunks * length].permute(2, 0, 1, 3).unflatten(2, (chunks, length))
    token_lr = torch.rand(images, n, groups, generator=gen)[:, :chunks * length].permute(
        2, 0, 1).unflatten(2, (chunks, length))
    return [*_weights(groups, d, gen), written[..., :d], written[..., d:], token_lr]


# (groups, chunks, L, d, max_lr, tiles), as test_memory_kernels' write cases:
# masked columns, a masked hidden block, a masked row block, a small step
WRITE_CASES = {'d24_L24_blocks16': (2, 3, 24, 24, 1.0, dict(block_rows=16, block_hidden=64)),
               'd16_L8_default_blocks': (1, 2, 8, 16, 1.0, {}),
               'd20_L24_small_lr': (2, 2, 24, 20, 1e-3, dict(block_rows=16)),
               # 40 columns in two blocks, 32 + 16 (``kernel_tiles.column_blocks``); 160
               # hidden units in blocks of 64, the last masked
               'd40_L24_split': (1, 2, 24, 40, 1.0, dict(block_rows=16, block_hidden=64)),
               # the weights' pass: one 32-row block, then 8 rows in a 16-row step
               'd16_L40_blocks32': (1, 3, 40, 16, 1.0, dict(block_rows=32))}


# (images, tokens, d, heads, L, written chunks, block_rows): masked columns and
# a masked row block; two heads with a partial chunk that only reads; no writes
PROJECTION_BACKWARD_CASES = {'d20_L24': (2, 50, 20, 1, 24, 2, None),
                    'heads2_d40': (2, 20, 40, 2, 8, 2, 16),
                    'no_writes': (1, 12, 16, 1, 8, 0, None),
                    # rows in two column blocks (M4's 160 as 128 + 32): 40 as 32 + 16,
                    # the head's columns too; 80 as 64 + 16 with two heads of 40 as
                    # 32 + 16, and with five heads of 16 in one block each
                    'd40_split': (2, 20, 40, 1, 8, 2, 16),
                    'heads2_d80_split': (1, 20, 80, 2, 8, 2, 16),
                    'heads5_d80_split': (1, 20, 80, 5, 8, 2, 16)}
# the launches' (BE, BHE) where a case splits its rows
PROJECTION_BACKWARD_SPLITS = {'d40_split': (16, 16), 'heads2_d80_split': (16, 16),
                     'heads5_d80_split': (16, 0)}
# the backward's output features per product that every case also runs at, beside
# its default: whole rows, and blocks of 16 (40 columns as 16 + 16 + 8 masked)
PROJECTION_OUTPUT_BLOCKS = (0, 16)


def _project_case(gen: torch.Generator, dtype: torch.dtype, b: int, n: int, d: int, heads: int,
                  length: int, updates: int, block_rows: int, device: str = 'cpu') -> dict:
    """The projections of a strided x, every result's cotangent random: the
    results' errors, and x's and every parameter's gradient against float64 autograd through
    ``project_naive``. The pool's softmax runs over a chunk's tokens, so its
    logits' bias has a zero gradient: only its size against the logits' is kept."""
    weights = [torch.randn(*shape, generator=gen) * 0.5 for shape in projection_shapes(d, heads)]
    x = torch.randn(b, d, n, generator=gen).transpose(1, 2)
    got, exact = _leaves(weights + [x], device), _leaves([t.double() for t in weights + [x]])
    out = project_triton(got[-1], ProjectionWeights(*got[:-1]), updates, length, 0.5, dtype,
                         block_rows=block_rows)
    ref = project_naive(exact[-1], ProjectionWeights(*exact[:-1]), updates, length, 0.5)
    cotangents = [torch.randn(t.shape, generator=gen) for t in ref]
    torch.autograd.backward(list(out), [t.to(device) for t in cotangents])
    torch.autograd.backward(list(ref), [t.double() for t in cotangents])
    names = [*ProjectionWeights._fields, 'x']
    grads = _grad_errors(names, got, exact)
    bias = names.index('logits_bias')
    grads.pop('logits_bias')
    if not updates:  # nothing written: only x and the queries' parameters have gradients
        grads = {k: v for k, v in grads.items() if k in ('x', 'retrieve_norm', 'queries',
                                                          'query_gamma')}
    logits = got[names.index('logits')].grad.cpu()
    return dict(grads=grads, logits_bias=(got[bias].grad.cpu().abs().max() /
                                          logits.abs().max().clamp_min(1e-30)).item(),
                outputs={name: _rel_err(o.detach().cpu(), r.detach())
                         for name, o, r in zip(ref._fields, out, ref) if r.numel()})


def _exact_queries_backward() -> dict:
    """``project_triton`` with and without exact queries (float16 operands,
    two heads, a partial chunk), one set of cotangents: the backward, which
    multiplies in the operand dtype either way, must give the same
    gradients; the forward's queries differ."""
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(*shape, generator=gen) * 0.5 for shape in projection_shapes(24, 2)]
    x = torch.randn(2, 20, 24, generator=gen)
    outputs, grads = [], []
    cotangents = None
    for exact in (False, True):
        leaves = _leaves(weights + [x])
        out = project_triton(leaves[-1], ProjectionWeights(*leaves[:-1]), 2, 8, 0.5,
                             torch.float16, exact_queries=exact)
        cotangents = cotangents or [torch.randn(t.shape, generator=gen) for t in out]
        torch.autograd.backward(list(out), cotangents)
        outputs.append(out.queries.detach())
        grads.append([t.grad for t in leaves])
    return dict(grads_apart=max((a - b).abs().max().item() for a, b in zip(*grads)),
                queries_apart=(outputs[0] - outputs[1]).abs().max().item())


def _module_case(dtype: str, max_lr: float, **settings) -> dict:
    """``NeuralMemory(implementation='triton')`` in training against ``'torch'``:
    the plan, the output and every parameter's and the input's gradient."""
    import copy
    torch.manual_seed(0)
    torch_path = NeuralMemory(32, heads=2, chunk_size=8, max_lr=max_lr, implementation='torch',
                              operand_dtype=dtype, **settings).train()
    with torch.no_grad():  # W_0 and the gates away from their zero init: all paths matter
        for p in torch_path.parameters():
            p.add_(0.05 * torch.randn_like(p))
    triton_path = copy.deepcopy(torch_path)
    triton_path.implementation = 'triton'
    x = torch.randn(2, 20, 32)
    cotangent = torch.randn(2, 20, 32)
    results = {}
    outputs, grads = [], []
    for memory in (triton_path, torch_path):
        xs = x.clone().requires_grad_()
        plan = memory.plan(xs)
        out = memory(xs)
        out.backward(cotangent)
        outputs.append(out.detach())
        grads.append({name: p.grad for name, p in memory.named_parameters()} | {'x': xs.grad})
        results.setdefault('plans', []).append(plan.implementation)
    results['forward'] = _rel_err(outputs[0], outputs[1].double())
    # the pooling's softmax runs over a chunk's tokens, so a per-feature bias
    # of its logits has a zero gradient: rounding noise, with no scale to compare
    results['grads'] = {name: _rel_err(grads[0][name], grads[1][name].double())
                        for name in grads[1]
                        if grads[1][name] is not None and name != 'pool.to_logits.bias'}
    return results


# the write cases that also run as one program per chunk, forward and backward
# (masked columns and hidden block, a 32-row block and a tail, the projections' views)
ONE_PROGRAM_CASES = ['d40_L24_split', 'd16_L40_blocks32', 'per_image']


def _one_program_per_chunk(split: bool = False):
    return kernel_tiles.forced_tiles_of({kernel: dict(split=1) if split else {}
                                   for kernel in kernel_tiles.REPLACES})


@contextlib.contextmanager
def _split_columns(split: bool = True):
    """With ``split``, every kernel but those of ``REPLACES`` (forcing one
    chooses it) holds a row in two column blocks where ``column_blocks``
    finds two. Yields a list that gets the launches' (kernel, BE), sorted,
    once the block ends."""
    seen = []
    with kernel_tiles.forced_column_blocks(1 if split else None), \
            launcher.observing_launches() as launches:
        yield seen
    seen.extend(sorted({(x.kernel.__name__, x.kwargs.get('BE', 0)) for x in launches}))


def backward_results() -> Dict[str, dict]:
    """Every interpreter case (the subprocess's result)."""
    gen = torch.Generator().manual_seed(0)
    results = {}
    for tag, dtype in DTYPES.items():
        per_image = _per_image_views(gen)
        for name, (groups, chunks, length, d, max_lr, tiles) in WRITE_CASES.items():
            w, keys, values, token_lr = _write_inputs(groups, chunks, length, d, max_lr, seed=d)
            split = name.endswith('_split')
            with _split_columns(split) as seen:
                results[f'chunk_grads_{tag}_{name}'] = _chunk_grads_case(
                    [*w, keys, values, token_lr], dtype, tiles)
            results[f'chunk_grads_{tag}_{name}']['launched'] = seen
            if name in ONE_PROGRAM_CASES:
                with _one_program_per_chunk(split), launcher.observing_launches() as launches:
                    results[f'chunk_grads_one_program_{tag}_{name}'] = _chunk_grads_case(
                        [*w, keys, values, token_lr], dtype, tiles)
                results[f'chunk_grads_one_program_{tag}_{name}']['launched'] = sorted(
                    {(x.kernel.__name__, x.kwargs.get('BE', 0)) for x in launches})
        results[f'chunk_grads_per_image_{tag}'] = _chunk_grads_case(per_image, dtype, {})
        with _one_program_per_chunk():
            results[f'chunk_grads_one_program_{tag}_per_image'] = _chunk_grads_case(
                per_image, dtype, {})
        results[f'read_{tag}'] = _read_case(gen, dtype, decomposed=False)
        # 40 rows: one 32-row block, then 8 rows in a 16-row step; 40 columns as 32 + 16
        with _split_columns() as seen:
            results[f'read_rows32_{tag}'] = _read_case(gen, dtype, decomposed=False, d=40,
                                                       tiles=dict(block_rows=32, block_hidden=64))
        results[f'read_rows32_{tag}']['launched'] = seen
        results[f'read_decomposed_{tag}'] = _read_case(gen, dtype, decomposed=True)
        # 40 columns as 32 + 16 (M4's 160 as 128 + 32: a decomposed read splits too)
        with _split_columns() as seen:
            results[f'read_decomposed_split_{tag}'] = _read_case(
                torch.Generator().manual_seed(1), dtype, decomposed=True, d=40)
        results[f'read_decomposed_split_{tag}']['launched'] = seen
        results[f'chunk_read_{tag}'] = _chunk_read_case(gen, dtype, decomposed=False)
        results[f'chunk_read_decomposed_{tag}'] = _chunk_read_case(gen, dtype, decomposed=True)
        results.update(_read_one_program_results(tag, dtype))
        for name, case in PROJECTION_BACKWARD_CASES.items():
            split = int(name in PROJECTION_BACKWARD_SPLITS)
            # the default output block, then each of PROJECTION_OUTPUT_BLOCKS
            for suffix, block in [('', {})] + [(f'_BO{b}', dict(BO=b))
                                               for b in PROJECTION_OUTPUT_BLOCKS]:
                key = f'project_{tag}_{name}{suffix}'
                with kernel_tiles.forced_column_blocks(split), \
                        kernel_tiles.forced_tiles('project_backward', split=split, **block), \
                        launcher.observing_launches() as launches:
                    results[key] = _project_case(gen, dtype, *case)
                results[key].update(launched=_launched_projection_blocks(launches),
                                    output_blocks=_launched_output_blocks(launches))
    results['project_exact_queries_backward'] = _exact_queries_backward()
    results.update(_16_bit_training_results())
    results.update(_projection_row_group_results())
    # more than 4096 rows per group: pseudo-chunks of 4096 share the group's
    # weights, and their gradients must add up
    results['read_past_4096_rows'] = _read_case(gen, torch.float32, False, m=4096 + 40, d=16,
                                                tiles=dict(block_rows=512, block_hidden=64),
                                                per_head=1)
    # every load and store of a training step inside its tensors: past them the
    # interpreter reads a neighbour silently, where a GPU faults
    with checked_accesses():
        results['module_f32'] = _module_case('float32', 1.0)
        results['module_f16_decomposed'] = _module_case('float16', 1e-3)
        # the backward reruns the forward (torch.utils.checkpoint) through the operators
        results['module_f32_recompute'] = _module_case('float32', 1.0, recompute=True)
        # GELU's tanh form through a training step's kernels: the write's two
        # passes and the chunk read; below, one program per chunk and the read
        results['module_f32_tanh'] = _module_case('float32', 1.0, gelu_approximate='tanh')
    w, keys, values, token_lr = _write_inputs(2, 3, 24, 24, 1.0, seed=24)
    with _one_program_per_chunk():
        results['chunk_grads_one_program_tanh'] = _chunk_grads_case(
            [*w, keys, values, token_lr], torch.float32, dict(block_rows=16),
            gelu_approximate='tanh')
    # the backward's columns pass summing 2 chunks per program: 3 chunks as 2 + 1
    from convneur_mm.models.layers.memory_ops.chunk_grads import triton as chunk_grads_module
    with mock.patch.object(chunk_grads_module, 'MAX_BACKWARD_COLS_CHUNKS', 2), \
            launcher.observing_launches() as launches:
        results['chunk_grads_cols_chunks2'] = _chunk_grads_case(
            [*w, keys, values, token_lr], torch.float32, dict(block_rows=16))
    # (programs, chunk blocks, chunks per program, the shares' blocks)
    results['chunk_grads_cols_chunks2']['launched'] = [
        [x.grid[0], *x.args[15:17], x.args[7].shape[1]] for x in launches
        if x.kernel.__name__ == 'grads_backward_cols_kernel']
    results['read_tanh'] = _read_case(gen, torch.float32, False, gelu_approximate='tanh')
    # the decomposed read in two column blocks; its own seed: the carry's gradient, a
    # sum that cancels, is 1e-6 to 1.3e-5 off float64 across draws, split or not
    with _split_columns() as seen:
        results['read_decomposed_tanh'] = _read_case(torch.Generator().manual_seed(0),
                                                     torch.float32, True, d=40,
                                                     gelu_approximate='tanh')
    results['read_decomposed_tanh']['launched'] = seen
    return results


def _projection_row_group_results() -> Dict[str, dict]:
    """The projections with each chunk's rows over several programs (as at
    COCO's chunks of 4096, forced here by asking for 64 programs per
    multiprocessor): 2 images, chunks of 40 rows (two written, a last one of
    10), forward and backward against float64; 16-row blocks as 3 groups,
    the default ones (32 rows forward, 16 backward) as 2 and 3. Each case
    with its launches' (kernel, programs). Their own seed."""
    results = {}
    for tag, dtype in DTYPES.items():
        for name, block_rows in (('', None), ('_rows16', 16)):
            # every access bounds-checked, new tensors NaN: the merge writes every pooled row
            with mock.patch.object(kernel_tiles, 'MIN_PROGRAMS_PER_SM', 64), \
                    launcher.observing_launches() as launches, nan_filled_allocations(), \
                    checked_accesses():
                case = results[f'project_groups_{tag}{name}'] = _project_case(
                    torch.Generator().manual_seed(3), dtype, 2, 90, 16, 1, 40, 2, block_rows)
            case['launched'] = [[x.kernel.__name__, x.grid[0]] for x in launches]
    return results


def _16_bit_training_results() -> Dict[str, dict]:
    """bfloat16 training's 16-bit chunk gradients and states, in float16 (the
    interpreter has no bfloat16): the chunk gradients' and the chunk read's
    backward (both passes, and one program per chunk or state), and a memory
    trained with them. Their own seed: the cases before draw as they did."""
    from convneur_mm.models.layers import neural_memory
    f16 = torch.float16
    results = {}
    w, keys, values, token_lr = _write_inputs(2, 3, 24, 24, 1.0, seed=24)
    for tag, layout in (('', contextlib.nullcontext), ('_one_program', _one_program_per_chunk)):
        with layout():
            results[f'chunk_grads{tag}_f16_grads'] = _chunk_grads_case(
                [*w, keys, values, token_lr], f16, dict(block_rows=16), grads_dtype=f16)
            for decomposed in (False, True):
                name = f'chunk_read{tag}{"_decomposed" * decomposed}_f16_states'
                results[name] = _chunk_read_case(torch.Generator().manual_seed(5), f16,
                                                 decomposed, state_dtype=f16)
    # the memory, with float16 let in as bfloat16 is (its chunk gradients 16-bit at a
    # decomposed read too, as bfloat16's): the scan's gradients and states as launched
    def grads_dtype(plan):
        every_kernel = plan.implementation == 'triton' and plan.scan == 'triton'
        return neural_memory._scan_state_dtypes(plan)[0] if every_kernel else None

    for name, max_lr in (('module_f16_states', 1.0), ('module_f16_states_decomposed', 1e-3)):
        with checked_accesses(), launcher.observing_launches() as launches, \
                mock.patch.object(neural_memory, 'TRAINING_STATE_DTYPES', (f16, )), \
                mock.patch.object(neural_memory, '_grads_dtype', grads_dtype):
            results[name] = _module_case('float16', max_lr)
        results[name]['scan_states'] = sorted(
            {str(x.args[5].dtype) for x in launches if x.kernel.__name__ == 'scan_kernel'})
        results[name]['scan_grads'] = sorted(
            {str(x.args[0].dtype) for x in launches if x.kernel.__name__ == 'scan_kernel'})
    return results


def _read_one_program_results(tag: str, dtype: torch.dtype) -> Dict[str, dict]:
    """The read's backward as one program per state, each case with the
    launches' (kernel, BE): the chunk read's partial last chunk, decomposed
    too; 40-row chunks as a 32-row block and a tail, also with 40 columns as
    32 + 16. Their own seed: the cases before draw as they did."""
    gen = torch.Generator().manual_seed(9)
    cases = {'chunk_read_one_program': ({}, lambda: _chunk_read_case(gen, dtype, False)),
             'chunk_read_one_program_decomposed': ({}, lambda: _chunk_read_case(gen, dtype, True)),
             'chunk_read_one_program_tail': (dict(BM=32), lambda: _chunk_read_case(
                 gen, dtype, False, sizes=(1, 2, 3, 40, 100, 24))),
             'chunk_read_one_program_split': (dict(BM=32, split=1), lambda: _chunk_read_case(
                 gen, dtype, False, sizes=(1, 2, 2, 40, 80, 40)))}
    results = {}
    for name, (options, case) in cases.items():
        with _split_columns('split' in options) as seen, \
                kernel_tiles.forced_tiles('read_backward_chunk', **options):
            results[f'{name}_{tag}'] = case()
        results[f'{name}_{tag}']['launched'] = seen
    return results


# the read's backward rows pass on an H200 (triton 3.6): 64-row tiles computed wrong
# query gradients or faulted, whatever their warps, stages or tail launch; 32 and 16
# rows (``kernel_tiles.row_limit``'s default there) and float32 operands were exact.
# A variant: (its tiles, operand dtype, sizes as _chunk_read_case's)
M3_STAGE1_READ = (1, 4, 4, 196, 784, 128)


READ_BACKWARD_VARIANTS = {
    'default': ({}, torch.bfloat16, M3_STAGE1_READ),
    'rows16': (dict(BM=16), torch.bfloat16, M3_STAGE1_READ),
    'rows64': (dict(BM=64), torch.bfloat16, M3_STAGE1_READ),
    'float32': ({}, torch.float32, M3_STAGE1_READ),
}


def read_backward_rows64_interpreted_results() -> dict:
    """(Interpreter) the GPU's failing case, ``READ_BACKWARD_VARIANTS['rows64']``
    at M3's stage-1 sizes, in float16 (the interpreter has no bfloat16), with
    new tensors NaN-filled and every access bounds-checked: each input's
    gradient against float64, beside the same at 32 rows."""
    results = {}
    for name, rows in (('rows64', 64), ('rows32', 32)):
        with kernel_tiles.forced_tiles('read_backward_rows', BM=rows), \
                nan_filled_allocations(), checked_accesses():
            results[name] = _chunk_read_case(torch.Generator().manual_seed(0), torch.float16,
                                             False, sizes=M3_STAGE1_READ)
    return results


def read_backward_on_cuda_results() -> dict:
    """(A subprocess: a fault ends it alone) M3's chunk read at stage 1's
    width on CUDA, its backward rows pass launched as
    ``READ_BACKWARD_VARIANTS[$CONVNEUR_READ_VARIANT]`` says: each input's
    gradient against float64."""
    options, dtype, sizes = READ_BACKWARD_VARIANTS[os.environ['CONVNEUR_READ_VARIANT']]
    with kernel_tiles.forced_tiles('read_backward_rows', **options):
        return _chunk_read_case(torch.Generator().manual_seed(0), dtype, False, sizes=sizes,
                                device='cuda')


CASES = ['read', 'read_rows32', 'read_decomposed', 'read_decomposed_split', 'chunk_read',
         'chunk_read_decomposed',
         'chunk_read_one_program', 'chunk_read_one_program_decomposed',
         'chunk_read_one_program_tail', 'chunk_read_one_program_split', 'chunk_grads_per_image',
         *(f'chunk_grads_{{}}_{name}' for name in WRITE_CASES),
         *(f'chunk_grads_one_program_{{}}_{name}' for name in ONE_PROGRAM_CASES),
         *(f'project_{{}}_{name}' for name in PROJECTION_BACKWARD_CASES),
         *(f'project_{{}}_{name}_BO{block}' for name in PROJECTION_BACKWARD_CASES
           for block in PROJECTION_OUTPUT_BLOCKS)]


def m4_projection_results() -> Dict[str, dict]:
    """The projections at M4's width, one chunk of 196 tokens at the
    default tiles (float16: 128 + 32 columns, forward and backward; float32:
    the backward only), forward and backward against float64, with the
    launches' (kernel, BE, BHE)."""
    results = {}
    for tag, dtype in (('f32', torch.float32), ('f16', torch.float16)):
        with launcher.observing_launches() as launches:
            results[tag] = _project_case(torch.Generator().manual_seed(160), dtype, 1, 196, 160,
                                         1, 196, 1, None)
        results[tag]['launched'] = _launched_projection_blocks(launches)
    return results


def _projection_launches(launches: list) -> list:
    """The projection kernels' launches, forward and backward: not the
    fold's or the row groups' merge."""
    return [x for x in launches if x.kernel.__name__.startswith('project')]


def _launched_projection_blocks(launches: list) -> list:
    """The projection launches' (kernel, BE, BHE), sorted, once each."""
    return sorted({(x.kernel.__name__, x.kwargs['BE'], x.kwargs['BHE'])
                   for x in _projection_launches(launches)})


def _launched_output_blocks(launches: list) -> list:
    """The projections' backward launches' BO, sorted, once each."""
    return sorted({x.kwargs['BO'] for x in launches
                   if x.kernel.__name__ == 'project_backward_kernel'})


BF16 = torch.bfloat16
# the kernels a call launches unless a kernel that replaces some is chosen
_TWO_PASSES = [k for k in kernel_tiles.KERNEL_NAMES if k not in kernel_tiles.REPLACES]


def own_tiles_results() -> dict:
    """(Interpreter) the chunk gradients with the weights' pass at 16 and 64
    hidden units per block, against its default of 32 (the rows pass's):
    the max-relative error of each."""
    from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
    gen = torch.Generator().manual_seed(0)
    d, L = 16, 20
    weights = MemoryWeights(torch.randn(1, d, 4 * d, generator=gen) / 4,
                            torch.randn(1, 4 * d, d, generator=gen) / 8,
                            torch.randn(1, d, generator=gen) / 10)
    keys = torch.randn(1, 3, L, d, generator=gen)
    values = torch.randn(1, 3, L, d, generator=gen)
    lr = torch.rand(1, 3, L, generator=gen)
    with torch.no_grad():
        base = chunk_grads_triton(weights, keys, values, lr, torch.float16)
        errors = {}
        for bh in (16, 64):
            with kernel_tiles.forced_tiles('grads_cols', BH=bh):
                got = chunk_grads_triton(weights, keys, values, lr, torch.float16)
            errors[bh] = worst(((a - b).abs().max() / b.abs().max()).item()
                             for a, b in zip(got, base))
    return errors


# persistent programs per multiprocessor, one multiprocessor in the interpreter: 6
# tiles run as 2 x 3 and 3 x 2 (programs x tiles each), 12 as 2 x 6 and 4 x 3.
# Programs and tiles per program differ both ways: at 2 x 2 a loop that strides
# by the wrong one covers the same tiles as the right one
PERSISTENT_PROGRAMS = (2, 4)


def persistent_results(operand_dtype: str = 'f16', programs: Tuple[int, ...] = PERSISTENT_PROGRAMS
                       ) -> dict:
    """(Interpreter) the chunk gradients (6 chunks of 16 rows) and a chunk
    read (6 states), forward and backward, with a program per tile and with
    each of ``programs`` persistent programs per multiprocessor: through the
    two passes, and through one program per chunk (the read's backward per
    state). Allocations start as NaN (an unwritten tile
    shows) and accesses are bounds-checked. Per layout: whether the per-tile
    results are finite, the largest difference of each persistent run from
    them (NaN if any is), and each launch's [kernel, tiles, programs, tiles
    per program]; and ``programs``.

    Args:
        operand_dtype: a key of ``DTYPES``.
        programs: the persistent runs' programs per multiprocessor.
    """
    dtype = DTYPES[operand_dtype]
    gen = torch.Generator().manual_seed(0)
    d, L, chunks = 16, 16, 6

    def rand(*shape, scale=1.0):
        return torch.randn(shape, generator=gen) * scale

    weights = [rand(1, d, 4 * d, scale=0.25), rand(1, 4 * d, d, scale=0.125),
               rand(1, d, scale=0.1)]
    keys, values = rand(1, chunks, L, d), rand(1, chunks, L, d)
    lr = torch.rand(1, chunks, L, generator=gen)
    states = [rand(1, 2, 3, d, 4 * d, scale=0.25), rand(1, 2, 3, 4 * d, d, scale=0.125),
              rand(1, 2, 3, d, scale=0.1)]
    queries = rand(1, 2, 3 * L - 4, d)
    inputs = weights + [keys, values, lr] + states + [queries]
    cotangents = [rand(1, chunks, d, 4 * d), rand(1, chunks, 4 * d, d), rand(1, chunks, d),
                  rand(2, 3 * L - 4, d)]  # the read merges the heads: (B, N, H d)

    def run():
        leaves = [t.clone().requires_grad_() for t in inputs]
        outputs = list(chunk_grads_triton(MemoryWeights(*leaves[:3]), *leaves[3:6], dtype))
        outputs.append(chunk_read_triton(MemoryWeights(*leaves[6:9]), leaves[9], L, dtype))
        return outputs + list(torch.autograd.grad(outputs, leaves, cotangents))

    result = {'programs': list(programs)}
    # the backward's columns pass at two chunks per program: 3 x 4 tiles (chunk blocks x
    # hidden blocks), which the persistent runs split both ways too
    from convneur_mm.models.layers.memory_ops.chunk_grads import triton as chunk_grads_module
    patched = mock.patch.object(chunk_grads_module, 'MAX_BACKWARD_COLS_CHUNKS', 2)
    for layout, one_program in (('two_passes', False), ('one_program', True)):
        kernels = kernel_tiles.KERNEL_NAMES if one_program else _TWO_PASSES
        chosen = {kernel: {} for kernel in kernel_tiles.REPLACES} if one_program else {}
        case = result[layout] = {}
        with nan_filled_allocations(), checked_accesses(), patched:
            with kernel_tiles.forced_tiles_of(chosen), launcher.observing_launches() as plain:
                base = run()
            case['finite'] = all(bool(torch.isfinite(t).all()) for t in base)
            for per_sm in programs:
                forced = {kernel: dict(programs_per_sm=per_sm) for kernel in kernels}
                with kernel_tiles.forced_tiles_of(forced), \
                        launcher.observing_launches() as launches:
                    got = run()
                case[f'max_diff_{per_sm}'] = worst((a - b).abs().max() for a, b in zip(base, got))
                case[f'launches_{per_sm}'] = [
                    [p.kernel.__name__, p.grid[0], x.grid[0], x.kwargs.get('ITERS', 1)]
                    for p, x in zip(plain, launches)]
    return result


def persistent_float32_results() -> dict:
    """``persistent_results`` with float32 operands: their tiles are smaller, 24
    of the columns passes' run as 8 x 3 too."""
    return persistent_results('f32', PERSISTENT_PROGRAMS + (8, ))


# The interpreter has no bfloat16: a bf16 entry is re-checked at its tiles in float16
INTERPRETED_DTYPE = {'float32': 'float32', 'float16': 'float16', 'bfloat16': 'float16'}
# the model width an entry's padded width speaks for: 256 is M4's 160 as 128 + 32 columns
MODEL_WIDTH = {256: 160}
# stand-ins at the interpreter's widths, so that the re-check runs while
# TUNED_TILES holds no entry: a persistent plain one, a decomposed read, a backward,
# the projections' backward, a kernel that replaces two (the read's backward per state)
STAND_IN_ENTRIES = (
    TunedTile('grads_rows', 90, 'bfloat16', 16, False, 16, 16, 4, 2, 2),
    TunedTile('read', 90, 'float16', 16, True, 16, 16, 4, 2),
    TunedTile('read_backward_rows', 90, 'bfloat16', 16, False, 32, 16, 4, 2),
    TunedTile('project_backward', 90, 'bfloat16', 16, False, 32, 16, 4, 2),
    TunedTile('read_backward_chunk', 90, 'bfloat16', 16, False, 16, 16, 8, 2))


def tuned_entry_results() -> dict:
    """(Interpreter) each ``tuned.TUNED_TILES`` entry, and ``STAND_IN_ENTRIES``,
    forced at its tiles: a memory of the width it serves (one head, C_m =
    ``block_d``, M4's 160 for 256), chunks of two tiles and a part (196 rows
    end in a part too), through the kernels, forward and backward, in its operand
    dtype (``INTERPRETED_DTYPE``), against the same memory in float64 on the
    PyTorch path: {entry: [the worst, over the output, the input's and the
    parameters' gradients, of the kernels' norm-relative error over what is
    allowed: ``F16_TOL``, or twice the PyTorch path's own error in that dtype
    where a sum that nearly cancels makes that larger; whether the entry's
    kernel launched at its tiles]}."""
    import copy

    from convneur_mm.models.layers.memory_ops.kernels import tuned
    results = {}
    for entry in tuple(tuned.TUNED_TILES) + STAND_IN_ENTRIES:
        torch.manual_seed(0)
        max_lr = 1e-3 if entry.decomposed else 1.0  # below 0.5 16-bit reads decompose
        chunk, d = 2 * entry.BM + 4, MODEL_WIDTH.get(entry.block_d, entry.block_d)
        memory = NeuralMemory(d, chunk_size=chunk, max_lr=max_lr,
                              implementation='triton',
                              operand_dtype=INTERPRETED_DTYPE[entry.operand_dtype]).train()
        exact = copy.deepcopy(memory).double()
        exact.implementation, exact.operand_dtype = 'torch', 'auto'
        torch_path = copy.deepcopy(memory)
        torch_path.implementation = 'torch'
        x = torch.randn(2, 2 * chunk + 8, d)  # two written chunks and a part
        bar = torch.randn_like(x)

        def step(module, dtype):
            inp = x.to(dtype).requires_grad_()
            with kernel_tiles.forced_tiles(entry.kernel, **entry.options()):  # backward too
                out = module(inp)
                grads = torch.autograd.grad(out, [inp] + list(module.parameters()),
                                            bar.to(dtype), allow_unused=True)
            return [out] + [g for g in grads if g is not None]

        with nan_filled_allocations(), launcher.observing_launches() as launches:
            got = step(memory, torch.float32)
        tiles = {key: value for key, value in entry.options().items() if key in ('BM', 'BH')}
        at_tiles = any(x.kernel.__name__ == f'{entry.kernel}_kernel' and
                       {key: x.kwargs.get(key) for key in tiles} == tiles for x in launches)
        want = step(exact, torch.float64)
        rounded = step(torch_path, torch.float32)
        # pool.to_logits.bias: a shift under the softmax, its exact gradient zero
        results[repr(entry)] = [worst(_norm_err(g, w) / max(F16_TOL, 2 * _norm_err(r, w))
                                      for g, r, w in zip(got, rounded, want)
                                      if w.norm() > 1e-9), at_tiles]
    return results


def _projection_blocks(d=160, heads=1, dtype=BF16, features=None, backward=False, tiles=False):
    from convneur_mm.models.layers.memory_ops.project.triton import projection_tiles
    config = projection_tiles(d, heads, 196, None, features, dtype, backward)
    return tuple(config[k] for k in ('BD', 'BE', 'BHD', 'BHE') + (('BM', 'BK') if tiles else ()))


D, L, BATCH, TOKENS = 32, 40, 2, 3 * 40 + 5  # three written chunks, a partial fourth


OPS = ('memory_chunk_grads', 'memory_read', 'memory_chunk_read', 'memory_project', 'memory_scan',
       'memory_gates', 'memory_fold')
# the cases whose autograd and backward operator opcheck runs (the per-image
# views' backward is checked against float64 in test_memory_kernels_backward)
DIFFERENTIABLE = ('chunk_grads', 'read', 'read_decomposed', 'chunk_read', 'chunk_read_decomposed',
                  'project', 'scan', 'scan_updates', 'gates')


def _case_weights(lead: Tuple[int, ...], d: int, gen: torch.Generator) -> Tuple[torch.Tensor, ...]:
    return (torch.randn(*lead, d, 4 * d, generator=gen) * d**-0.5,
            torch.randn(*lead, 4 * d, d, generator=gen) * (4 * d)**-0.5,
            torch.randn(*lead, d, generator=gen) * 0.1)


def op_cases(dtype: torch.dtype, seed: int = 0) -> Dict[str, Tuple[object, tuple]]:
    """{case: (operator, arguments)} at tiny shapes: 4-D and per-image 5-D
    keys (strided views), plain and decomposed reads, a partial last chunk."""
    gen = torch.Generator().manual_seed(seed)
    ops = torch.ops.convneur_mm
    heads, batch, chunks, length, d = 2, 2, 2, 8, 16
    keys = torch.randn(heads, length, chunks, d, generator=gen).transpose(1, 2)
    per_image = torch.randn(heads, batch, chunks, length, d, generator=gen)
    values = torch.randn(heads, chunks, length, d, generator=gen)
    token_lr = torch.rand(heads, chunks, length, generator=gen)
    w = _case_weights((heads, ), d, gen)
    groups = heads * batch
    x = torch.randn(groups, 12, d, generator=gen)
    delta = tuple(t * 1e-2 for t in _case_weights((groups, ), d, gen))
    carry = torch.rand(groups, generator=gen)
    states = _case_weights((heads, batch, chunks), d, gen)
    queries = torch.randn(heads, batch, chunks * length - 3, d, generator=gen)
    tiles = (16, 32)
    projection = ProjectionWeights(*(torch.randn(*shape, generator=gen) * 0.3
                                     for shape in projection_shapes(d, heads)))
    # x a strided view; 20 tokens in chunks of 8: two written, a partial last one
    x_tokens = torch.randn(batch, d, 20, generator=gen).transpose(1, 2)
    project_args = (x_tokens, *fold(projection))
    cases = {
        'chunk_grads': (ops.memory_chunk_grads, (*w, keys, values, token_lr, dtype, *tiles)),
        'chunk_grads_per_image': (ops.memory_chunk_grads, (
            *w, per_image, per_image * 0.5, token_lr[:, None].expand(heads, batch, chunks, length),
            dtype, None, None)),
        'read': (ops.memory_read, (*_case_weights((groups, ), d, gen), x, None, None, None, dtype,
                                   *tiles)),
        'read_decomposed': (ops.memory_read, (*delta, x, *w[:2], carry, dtype, *tiles)),
        'chunk_read': (ops.memory_chunk_read, (*states, queries, length, None, None, None,
                                               dtype, *tiles)),
        'chunk_read_decomposed': (ops.memory_chunk_read, (
            *(t * 1e-2 for t in states), queries, length, *w[:2],
            torch.rand(heads, batch, chunks, generator=gen), dtype, *tiles)),
        # exact queries (float32 beside 16-bit others; a no-op with float32 operands)
        'project': (ops.memory_project, (*project_args, 2, 8, 0.5, dtype, True, 16, None)),
        'project_one_chunk': (ops.memory_project, (*project_args, 0, 32, 0.5, dtype, False, None,
                                                   None)),
        # the states of 3 steps of (N = 4, P = 40) weights, from W_0 and from zero
        'scan': (ops.memory_scan, (*_scan_args(gen), torch.randn(4, 40, generator=gen), dtype)),
        'scan_updates': (ops.memory_scan, (*_scan_args(gen), None, torch.float32)),
        # 3 chunks' summaries as a strided view; float32 whatever the operands
        'gates': (ops.memory_gates, (torch.randn(batch, d, 3, generator=gen).transpose(1, 2),
                                     *_gate_args(heads, d, gen))),
        # inference's fold, the weight in the operand dtype
        'fold': (ops.memory_fold, (*projection, dtype)),
    }
    # the backward operators: the forward's tensors, then the outputs' cotangents
    for name in DIFFERENTIABLE:
        op, args = cases[name]
        if name == 'gates':  # its backward is PyTorch's: no operator
            continue
        if name.startswith('scan'):  # its backward takes the saved states too (float32)
            n, u, p = args[0].shape
            states, bar = (torch.randn(n, u + 1, p, generator=gen) for _ in range(2))
            cases[f'{name}_backward'] = (ops.memory_scan_backward, (*args[:5], states, bar))
            continue
        if name == 'project':  # its backward takes the pooled rows and log-sum-exp too
            x_, updates, length_ = args[0], args[4], args[5]
            hd = d // heads
            pooled, lse, *bars = (torch.randn(shape, generator=gen) for shape in (
                (batch, updates, d), (batch, updates, d), (heads, batch, x_.shape[1], hd),
                (heads, batch, updates * length_, hd), (heads, batch, updates * length_, hd),
                (heads, batch, updates * length_), (batch, updates, d)))
            cases['project_backward'] = (ops.memory_project_backward,
                                         (*args[:4], pooled, lse, *bars, *args[4:8], args[9]))
            continue
        if name.startswith('chunk_grads'):
            groups, chunks, d = args[0].shape[0], token_lr.shape[1], args[0].shape[1]
            if name.endswith('per_image'):
                chunks = batch * chunks
            shapes = [(groups, chunks, d, 4 * d), (groups, chunks, 4 * d, d), (groups, chunks, d)]
            tensor_args, backward = 6, ops.memory_chunk_grads_backward
        elif name.startswith('chunk_read'):
            q = args[3]  # (H, B, N, d), heads merged in the output
            shapes = [(*q.shape[1:3], q.shape[0] * q.shape[3])]
            tensor_args, backward = 8, ops.memory_chunk_read_backward
        else:
            shapes, tensor_args, backward = [args[3].shape], 7, ops.memory_read_backward
        cotangents = [torch.randn(shape, generator=gen) for shape in shapes]
        cases[f'{name}_backward'] = (backward, (*args[:tensor_args], *cotangents,
                                                *args[tensor_args:]))
    if dtype == torch.float16:  # bf16 training's 16-bit states and chunk gradients
        cases.update(_16_bit_backward_cases(cases, gen))
    return cases


# the backward operators' cases at 16-bit states and chunk gradients (``op_cases``'
# float16 cases only): each gradient of a 16-bit input comes in its dtype
SIXTEEN_BIT_BACKWARDS = ('scan_backward_16_bit', 'chunk_read_backward_16_bit',
                         'chunk_grads_backward_16_bit')


def _16_bit_backward_cases(cases: dict, gen: torch.Generator) -> dict:
    """``SIXTEEN_BIT_BACKWARDS`` from the float16 cases: the scan's gradients,
    states and cotangents, the chunk read's w1 and w2 states and the chunk
    gradients' w1 and w2 cotangents in float16."""
    half = lambda t: t.half()  # noqa: E731
    op, args = cases['scan_backward']
    scan = (half(args[0]), *args[1:5], half(args[5]), half(args[6]))
    op_read, read = cases['chunk_read_backward']
    op_grads, grads = cases['chunk_grads_backward']
    return {'scan_backward_16_bit': (op, scan),
            'chunk_read_backward_16_bit': (op_read, (half(read[0]), half(read[1]), *read[2:])),
            'chunk_grads_backward_16_bit': (op_grads, (*grads[:6], half(grads[6]),
                                                       half(grads[7]), *grads[8:]))}


def _gate_args(heads: int, d: int, gen: torch.Generator) -> GateWeights:
    """The gate layers' weights and biases at ``heads`` heads of width ``d``."""
    return GateWeights(*(torch.randn(rows, *cols, generator=gen) * scale
                         for rows in (heads, heads, 3 * heads)
                         for cols, scale in (((d, ), d**-0.5), ((), 1.0))))


def _scan_args(gen: torch.Generator) -> Tuple[torch.Tensor, ...]:
    """Gradients (4, 3, 40) as a strided view, rho, log(1 - alpha), log(eta)."""
    gates = torch.nn.functional.logsigmoid(torch.randn(2, 4, 3, generator=gen))
    return (torch.randn(40, 4, 3, generator=gen).permute(1, 2, 0),
            torch.rand(4, 3, generator=gen), gates[0], gates[1])


def _requiring_grad(args: tuple) -> tuple:
    """The floating tensors of ``args`` as leaves that require grad."""
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                 for a in args)


def _layout(outputs) -> list:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs, )
    return [[list(t.shape), str(t.dtype)] for t in outputs]


def _on_meta(args: tuple) -> tuple:
    return tuple(a.to('meta') if isinstance(a, torch.Tensor) else a for a in args)


def _compiled_calls(dtype: torch.dtype) -> dict:
    """A function calling the three operations' Triton wrappers, eager against
    ``torch.compile(backend='aot_eager', fullgraph=True)``; its graph breaks
    and the operators in its graph."""
    cases = op_cases(dtype)
    w1, w2, g, keys, values, token_lr = cases['chunk_grads'][1][:6]
    states, queries, length = cases['chunk_read'][1][:3], *cases['chunk_read'][1][3:5]

    x = cases['project'][1][0]
    projection = ProjectionWeights(*(torch.randn(*shape) for shape in projection_shapes(16, 1)))

    def fn(w1, w2, g, keys, values, token_lr, queries):
        grads = chunk_grads_triton(MemoryWeights(w1, w2, g), keys, values, token_lr, dtype)
        read = read_triton(MemoryWeights(w1, w2, g), keys.flatten(1, 2), dtype)
        chunked = chunk_read_triton(MemoryWeights(*states), queries, length, dtype)
        scanned = scan_states_triton([grads[0].flatten(2)], token_lr[None, :, :, 0],
                                     token_lr[..., 1], token_lr[..., 2], [None],
                                     state_dtypes=[dtype])
        gates = chunk_gates_triton(*cases['gates'][1][:1], GateWeights(*cases['gates'][1][1:]))
        return (*grads, read, chunked, *project_triton(x, projection, 2, 8, 1.0, dtype),
                *scanned, *gates)

    args = (w1, w2, g, keys, values, token_lr, queries)
    eager = fn(*args)
    compiled = torch.compile(fn, backend='aot_eager', fullgraph=True)(*args)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    code = ''.join(graph.code for graph in explanation.graphs)
    return dict(difference=worst((a - b).abs().max().item() for a, b in zip(eager, compiled)),
                graph_breaks=explanation.graph_break_count,
                ops=[op for op in OPS if f'convneur_mm.{op}' in code])


def _compiled_memory() -> dict:
    """``NeuralMemory(implementation='triton')`` in inference, compiled with
    ``fullgraph=True``: the plan takes the kernels inside the graph."""
    torch.manual_seed(0)
    memory = NeuralMemory(16, heads=2, chunk_size=8, implementation='triton').eval()
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        eager = memory(x)
        compiled = torch.compile(memory, backend='aot_eager', fullgraph=True)(x)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(memory)(x)
    code = ''.join(graph.code for graph in explanation.graphs)
    return dict(difference=(eager - compiled).abs().max().item(),
                graph_breaks=explanation.graph_break_count,
                ops=[op for op in OPS if f'convneur_mm.{op}' in code])


def _compiled_training(operand_dtype: str = 'float32', max_lr: float = 1.0) -> dict:
    """``NeuralMemory(implementation='triton')`` in training, compiled with
    ``fullgraph=True``: the kernels and their backward operators inside the
    graphs, the gradients as eager's. ``'float16'`` trains on 16-bit states
    and chunk gradients, as bfloat16 does (``TRAINING_STATE_DTYPES``); a
    ``max_lr`` below 0.5 decomposes the read."""
    from convneur_mm.models.layers import neural_memory
    with mock.patch.object(neural_memory, 'TRAINING_STATE_DTYPES', (torch.float16, )):
        return _compiled_training_step(operand_dtype, max_lr)


def _compiled_training_step(operand_dtype: str, max_lr: float) -> dict:
    torch.manual_seed(0)
    memory = NeuralMemory(16, heads=2, chunk_size=8, implementation='triton',
                          operand_dtype=operand_dtype, max_lr=max_lr).train()
    x = torch.randn(2, 20, 16)

    def grads(module):
        module.zero_grad()
        module(x).square().sum().backward()
        return [p.grad.clone() for p in memory.parameters() if p.grad is not None]

    eager = grads(memory)
    compiled = grads(torch.compile(memory, backend='aot_eager', fullgraph=True))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(memory)(x)
    code = ''.join(graph.code for graph in explanation.graphs)
    return dict(difference=worst((a - b).abs().max().item() for a, b in zip(eager, compiled)),
                scale=worst(a.abs().max() for a in eager), grads=len(eager),
                graph_breaks=explanation.graph_break_count,
                ops=[op for op in OPS if f'convneur_mm.{op}' in code])


def _opcheck(op, args) -> dict:
    try:
        return torch.library.opcheck(op, args)
    except Exception as err:  # opcheck's error names the failing check
        return {'error': repr(err)[-2000:]}


# opcheck's cases: every operator in float32; the three product operators'
# forward in float16 too (opcheck's checks, of schemas, fakes and
# registrations, do not depend on the dtype, and each costs interpreter time)
OPCHECKED = [(case, tag) for tag in ('f32', 'f16') for case in op_cases(torch.float32)
             if tag == 'f32' or case in ('chunk_grads', 'chunk_grads_per_image', 'read',
                                         'read_decomposed', 'chunk_read',
                                         'chunk_read_decomposed')] + [
    (case, 'f16') for case in SIXTEEN_BIT_BACKWARDS]


def custom_op_results() -> dict:
    """Every interpreter case (the subprocess's result)."""
    results = {}
    for tag, dtype in (('f32', torch.float32), ('f16', torch.float16)):
        for name, (op, args) in op_cases(dtype).items():
            with torch.no_grad():
                real = _layout(op(*args))
                fake = _layout(op(*_on_meta(args)))
            report = _opcheck(op, args) if (name, tag) in OPCHECKED else None
            results[f'{name}_{tag}'] = dict(opcheck=report, real=real, fake=fake)
            if name in DIFFERENTIABLE and tag == 'f32':  # registered, traced with its backward
                results[f'{name}_grad'] = dict(opcheck=_opcheck(op, _requiring_grad(args)))
        results[f'compiled_calls_{tag}'] = _compiled_calls(dtype)
    results['compiled_memory'] = _compiled_memory()
    results['compiled_training'] = _compiled_training()
    results['compiled_training_f16_states'] = _compiled_training('float16')
    results['compiled_training_f16_states_decomposed'] = _compiled_training('float16', 1e-3)
    return results


def _weights64(groups: int, d: int, gen: torch.Generator, dtype=torch.float64) -> MemoryWeights:
    """Weights at the model's scale (Xavier-like products, a small g)."""
    return MemoryWeights((torch.randn(groups, d, 4 * d, generator=gen) * d**-0.5).to(dtype),
                         (torch.randn(groups, 4 * d, d, generator=gen) * (4 * d)**-0.5).to(dtype),
                         (torch.randn(groups, d, generator=gen) * 0.1).to(dtype))


def _write_inputs64(groups: int, chunks: int, length: int, d: int, seed: int = 0,
                  dtype=torch.float64) -> List[torch.Tensor]:
    """w1, w2, g, keys, values, token_lr, all requiring gradients."""
    gen = torch.Generator().manual_seed(seed)
    tensors = list(_weights64(groups, d, gen)) + [
        torch.randn(groups, chunks, length, d, generator=gen),
        torch.randn(groups, chunks, length, d, generator=gen),
        torch.rand(groups, chunks, length, generator=gen)]
    return [t.to(dtype).requires_grad_() for t in tensors]


def _read_inputs(groups: int, tokens: int, d: int, heads: Optional[int], seed: int = 0,
                 dtype=torch.float64) -> List[torch.Tensor]:
    """w1, w2, g, x, then with ``heads`` base w1, base w2 and carry: the
    decomposed read, whose w1 and w2 are the small updates dW."""
    gen = torch.Generator().manual_seed(seed)
    tensors = list(_weights64(groups, d, gen)) + [torch.randn(groups, tokens, d, generator=gen)]
    if heads:
        tensors[:2] = [t * 0.05 for t in tensors[:2]]
        tensors += list(_weights64(heads, d, gen))[:2] + [torch.rand(groups, generator=gen)]
    return [t.to(dtype).requires_grad_() for t in tensors]


def _write(fn, mm: Optional[torch.dtype] = None):
    return lambda *t: tuple(fn(MemoryWeights(*t[:3]), *t[3:], mm))


def _read(fn, mm: Optional[torch.dtype] = None):
    def read(*t):
        if len(t) == 4:
            return fn(MemoryWeights(*t[:3]), t[3], mm)
        return fn(MemoryWeights(*t[:3]), t[3], mm, MemoryWeights(t[4], t[5], None), t[6])
    return read


def _gradcheck(fn, inputs: List[torch.Tensor]) -> bool:
    """float64 gradcheck in fast mode: random projections of both Jacobians
    instead of every entry (which takes minutes on two cores)."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def _outputs_and_grads(fn, inputs: List[torch.Tensor], seed: int = 1) -> List[torch.Tensor]:
    """fn's outputs and the gradients of every input from fixed random
    output gradients."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs, )
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    return list(outputs) + list(torch.autograd.grad(outputs, inputs, cotangents))


def _relative_errors(result: List[torch.Tensor], reference: List[torch.Tensor]) -> List[float]:
    return [((a.double() - b.double()).norm() / b.double().norm()).item()
            for a, b in zip(result, reference)]


# bfloat16 operands. float32 inputs: the products round as the PyTorch ops'
# do, so the results agree closer (measured <= 2.5e-4 relative for the
# chunk gradients, <= 2.4e-6 for the read) than these bounds, and these are
# below every difference from the float32-operand results (measured >= 2.7e-3;
# >= 2.6e-4 for the decomposed read, whose W_0 products stay float32).
# float64 inputs (the exact products of rounded operands): the rounding
# points differ, and each error against the exact result is within this
# factor of the PyTorch ops' own (measured 0.88-1.09).
GRADS_BF16_AGREEMENT, READ_BF16_AGREEMENT = 1e-3, 1e-4
BF16_ERROR_RATIO = 1.5


def _check_bfloat16(wrap, ours, theirs, inputs: List[torch.Tensor], agreement: float) -> None:
    """``ours`` against ``theirs`` (``wrap`` makes each a function of the
    inputs) with bfloat16 operands, as the bounds above say."""
    rounded = _outputs_and_grads(wrap(ours, torch.bfloat16), inputs)
    reference = _outputs_and_grads(wrap(theirs, torch.bfloat16), inputs)
    if inputs[0].dtype == torch.float32:
        assert worst(_relative_errors(rounded, reference)) < agreement
        float32_operands = _outputs_and_grads(wrap(ours), inputs)
        assert least(_relative_errors(float32_operands, reference)) > agreement
    else:
        exact = _outputs_and_grads(wrap(theirs), inputs)
        for our_error, their_error in zip(_relative_errors(rounded, exact),
                                          _relative_errors(reference, exact)):
            assert 0 < our_error < BF16_ERROR_RATIO * their_error


def _op_weights(groups, d, gen):
    return MemoryWeights(torch.randn(groups, d, 4 * d, generator=gen).double() * 0.3,
                         torch.randn(groups, 4 * d, d, generator=gen).double() * 0.3,
                         torch.randn(groups, d, generator=gen).double() * 0.1)


if __name__ == '__main__':  # the interpreter subprocess of ``_run_interpreted``
    interpreted_runs.main(globals())
