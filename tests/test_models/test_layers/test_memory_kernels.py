"""The Triton implementations of the memory's operations against the PyTorch
ones and the references in float64.

On a CPU the kernels run in Triton's interpreter, which must be chosen before
the kernel module is imported: one subprocess with TRITON_INTERPRET=1 runs
every interpreter case at tiny shapes and reports its errors as JSON; the tests
below assert on them.

Tolerances, per output:
* float32 operands: max|kernel - ref| <= 1e-5 max|ref| against float64 (the
  kernels multiply in IEEE float32).
* float16 operands: ||kernel - ref|| <= 5e-5 ||ref|| against a float64
  emulation that rounds the same operands to float16 (it checks where the
  kernels round and that they sum in float32; a norm, because an operand that
  falls on the other side of a float16 rounding boundary moves single entries
  by up to 4e-5 of the max), and max|kernel - ref| <= 1e-2 max|ref| against
  exact float64 (float16's own error here is 3e-4 to 1e-3).
  At the models' widths (a slow test) longer sums flip more roundings: 1e-4.
* bfloat16: the interpreter multiplies bfloat16 bit patterns, so bfloat16 is
  checked on a GPU only (3e-2 against float64: bfloat16 keeps 8 bits, and a
  gradient's operands are rounded up to three times along its path).

The interpreter never sees the GPU code path; the kernels are also compiled
ahead of time for sm_80 and sm_90 (triton ships ptxas), which needs no GPU,
each with the specialization of the launch the wrappers make
(``kernels.inspect``), and ptxas' registers, spills and matrix instructions
are checked.
"""
import contextlib
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_grads_torch,
                                                  chunk_grads_triton, chunk_read_naive,
                                                  chunk_read_triton, kernels, read_torch,
                                                  read_triton)
from convneur_mm.models.layers.memory_ops.kernels import launcher
from convneur_mm.models.layers.memory_ops.kernels import tiles as kernel_tiles
from convneur_mm.models.layers.memory_ops.kernels import ops as kernel_ops
from convneur_mm.models.layers.memory_ops.read.triton import launch_read_backward
from convneur_mm.testing.dispatch_probes import LiveTensorBytes

from ... import interpreted as interpreted_runs

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


def _identity(t):
    return t


def _half(t):
    return t.half().double()


def _grads_errors(got: MemoryWeights, w, keys, values, token_lr) -> dict:
    exact = chunk_grads_torch(w.map(torch.Tensor.double), keys.double(), values.double(),
                         token_lr.double())
    half = _grads64(w, keys, values, token_lr, _half)
    return dict(exact=max(_rel_err(a, b) for a, b in zip(got, exact)),
                emulated=max(_norm_err(a, b) for a, b in zip(got, half)),
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
            difference=max((a - b).abs().max().item() for a, b in zip(views, copies)),
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
    results['modules'] = module_results()  # one subprocess: imports are most of its time
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
        exact=max(_rel_err(a, b) for a, b in zip(got, ref)),
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
    results['scan_backward'] = dict(exact=max(_rel_err(a, b) for a, b in zip(kernel, exact)),
                                    count=sum(a is not None for a in kernel))
    # updates 1e-4 of W_0: the momenta must not come from differences of states
    lr_mod, initial = lr_mod * 1e-4, [w * 10 for w in initial[:2]] + [None]
    exact = gradients(torch.float64, scan_states_naive)
    kernel = gradients(torch.float32, scan_states_triton)
    results['scan_backward_small_updates'] = dict(
        exact=max(_rel_err(a, b) for a, b in zip(kernel, exact)))
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
                exact=max(_rel_err(g, r) for g, r in zip(got, ref) if r.numel()),
                shapes=[list(t.shape) for t in got],
                want=[list(t.shape) for t in ref],
                tiles=sorted({tuple(x.kwargs[k] for k in ('BD', 'BE', 'BHD', 'BHE'))
                              for x in launches}))
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
    """``NeuralMemory(kernels='triton')`` against ``kernels='torch'`` and
    float64, end to end on the CPU in the interpreter: {case: errors}."""
    import copy

    from convneur_mm.models.layers import NeuralMemory
    cases = {  # 20 tokens in chunks of 8: two writes, a partial last chunk
        'two_heads': dict(dim=32, heads=2, chunk_size=8, tokens=20),
        'one_chunk': dict(dim=16, chunk_size=8, tokens=6),
        'sequential': dict(dim=16, chunk_size=8, tokens=20, update='sequential'),
        'decomposed_f16': dict(dim=16, chunk_size=8, tokens=20, max_lr=1e-3,
                               matmul_dtype='float16'),
    }
    results = {}
    for name, cfg in cases.items():
        tokens = cfg.pop('tokens')
        torch.manual_seed(0)
        ref = NeuralMemory(**cfg, kernels='torch').eval()
        triton = copy.deepcopy(ref)
        triton.kernels = 'triton'
        exact = copy.deepcopy(ref).double()
        exact.matmul_dtype = 'float32'
        x = torch.randn(2, tokens, cfg['dim'])
        with torch.no_grad():
            out = triton(x)
            results[name] = dict(vs_torch=_rel_err(out, ref(x).double()),
                                 exact=_rel_err(out, exact(x.double())))
    return results


def _run_interpreted(what: str, module: str = 'test_memory_kernels') -> dict:
    """``module``'s function ``what`` in a subprocess with TRITON_INTERPRET=1;
    its JSON result (the module prints it when run as a script)."""
    return interpreted_runs.result(what, module)


# the run of the ``interpreted`` fixture, which the session starts early (tests/interpreted.py)
INTERPRETED = ('interpreter_results', 'test_memory_kernels')


@pytest.fixture(scope='module')
def interpreted():
    return _run_interpreted(*INTERPRETED)


@pytest.mark.slow
def test_triton_kernels_at_model_widths_in_the_interpreter():
    for case, errors in _run_interpreted('model_width_results').items():
        tol = F32_TOL if case.startswith('f32') else F16_TOL
        assert errors['exact'] < tol and errors['read'] < tol, (case, errors)
        if case.startswith('f16'):  # more float16 rounding-boundary flips in longer sums
            assert errors['emulated'] < 2 * F16_EMULATED_TOL, (case, errors)


# L 24 in 16-row blocks: over each image's rows, blocks meeting two chunks;
# L 8: a block per chunk (16 rows, the least, are more than a chunk)
GRAD_CASES = ['d24_L24_blocks16', 'd16_L8_default_blocks', 'd20_L24_small_lr',
              'd16_L40_blocks32', 'per_image_rows']


@pytest.mark.parametrize('layout', [name for name, _ in LAYOUTS])
@pytest.mark.parametrize('case', GRAD_CASES)
def test_triton_grads_float32_match_float64(interpreted, case, layout):
    assert interpreted[f'grads{layout}_f32_{case}']['exact'] < F32_TOL


def test_one_program_per_chunk_ran_in_its_cases(interpreted):
    for case in GRAD_CASES[:4]:
        assert interpreted[f'grads_f16_{case}']['kernels'] == ['grads_rows_kernel',
                                                               'grads_cols_kernel']
        assert interpreted[f'grads_one_program_f16_{case}']['kernels'] == ['grads_chunk_kernel']


@pytest.mark.parametrize('layout', [name for name, _ in LAYOUTS])
@pytest.mark.parametrize('case', GRAD_CASES)
def test_triton_grads_float16_operands(interpreted, case, layout):
    errors = interpreted[f'grads{layout}_f16_{case}']
    assert errors['emulated'] < F16_EMULATED_TOL
    assert errors['exact'] < F16_TOL


@pytest.mark.parametrize('rows', ['', '_rows32'])
def test_triton_forward(interpreted, rows):
    assert interpreted[f'forward_f32_d24{rows}']['exact'] < F32_TOL
    assert interpreted[f'forward_f32_d24{rows}']['shapes'] == [[2, 40, 24]]
    assert interpreted[f'forward_f16_d24{rows}']['emulated'] < F16_EMULATED_TOL
    assert interpreted[f'forward_f16_d24{rows}']['exact'] < F16_TOL


def test_triton_chunk_read_merges_heads(interpreted):
    assert interpreted['read_chunks_f32']['shapes'] == [[2, 40, 32]]
    assert interpreted['read_chunks_f32']['exact'] < F32_TOL
    assert interpreted['read_chunks_f16']['exact'] < F16_TOL


def test_the_rows_pass_walks_each_images_rows():
    """Blocks over each image's U L rows where a block meets at most two
    chunks: M3's stage 1 takes 46 blocks of 64 rows per image (2944 rows for
    2940), where a block per chunk takes 60 (3840); a block wider than a
    chunk, or an image whose rows pass the int32 tile offsets, goes per chunk."""
    from convneur_mm.models.layers.memory_ops.chunk_grads.triton import _row_blocks
    meta = dict(device='meta')
    proj = torch.empty(128, 15 * 196, 1, 257, **meta).permute(2, 0, 1, 3).unflatten(2, (15, 196))
    keys, values, token_lr = proj[..., :128], proj[..., 128:256], proj[..., 256]
    rows = _row_blocks(keys, values, token_lr, 64)
    assert rows == (True, 46, 128 * 46, 5)
    assert _row_blocks(keys, values, token_lr, 256) == (False, 1, 128 * 15, 1)
    wide = torch.empty(1, 15, 196, 128, **meta).as_strided((1, 15, 196, 128),
                                                           (0, 2**28, 128, 1))
    flat_lr = torch.empty(1, 15, 196, **meta)
    assert not _row_blocks(wide, wide, flat_lr, 64).flat


def test_triton_grads_read_per_image_chunk_views_without_a_copy(interpreted):
    result = interpreted['grads_per_image_views']
    assert result['difference'] == 0
    assert result['shapes'] == [[2, 6, 16, 64], [2, 6, 64, 16], [2, 6, 16]]


@pytest.mark.parametrize('case', list(PROJECTION_CASES))
def test_triton_projections_match_the_layers_in_float64(interpreted, case):
    """One kernel for the RMSNorm, every projection, the per-head norms, the
    step sizes and the chunk summaries, against each layer in turn."""
    for tag, tol in (('f32', F32_TOL), ('f16', F16_TOL)):
        result = interpreted[f'project_{tag}_{case}']
        assert result['shapes'] == result['want']
        assert result['exact'] < tol, (tag, result)
        if case in PROJECTION_SPLITS:  # the split cases held their rows in two blocks
            assert result['tiles'] == [list(PROJECTION_SPLITS[case])], result
        else:
            assert all(be == bhe == 0 for _, be, _, bhe in result['tiles']), result


def test_triton_scan_matches_the_recursion(interpreted):
    """Step by step in float32 within 1e-5 of float64; 16-bit states are the
    float32 states cast (the read would round them the same way); the
    backward kernel gives every input's gradient within 1e-5 of float64."""
    backward = interpreted['scan_backward']
    assert backward['count'] == 8 and backward['exact'] < F32_TOL, backward
    assert interpreted['scan_backward_small_updates']['exact'] < F32_TOL
    result = interpreted['scan']
    assert result['exact'] < F32_TOL, result
    assert result['shapes'] == [[3, 6, 40], [3, 6, 1100], [3, 6, 7]]
    assert result['dtypes'] == ['torch.float16', 'torch.float16', 'torch.float32']
    assert result['cast_difference'] == 0


def test_interpreter_refuses_bfloat16(interpreted):
    # it would multiply bfloat16 bit patterns: a clear refusal, not garbage
    assert 'bfloat16' in interpreted['interpreter_bf16']['reason']
    assert interpreted['interpreter_bf16']['float32_reason'] is None


@pytest.fixture(scope='module')
def interpreted_modules(interpreted):
    return interpreted['modules']


@pytest.mark.parametrize('case', ['two_heads', 'one_chunk', 'sequential'])
def test_memory_with_triton_kernels_matches_the_pytorch_path(interpreted_modules, case):
    # kernels='triton' runs them in the interpreter on a CPU: the whole
    # module, written chunks, merged heads and the single-chunk read
    errors = interpreted_modules[case]
    assert errors['vs_torch'] < F32_TOL and errors['exact'] < F32_TOL, errors


def test_memory_with_triton_kernels_in_float16_decomposed(interpreted_modules):
    # max_lr 1e-3 and float16 operands: the decomposed read; the update is a
    # small part of the output, whose error is then mostly float32's (1e-6)
    errors = interpreted_modules['decomposed_f16']
    assert errors['vs_torch'] < 1e-4 and errors['exact'] < 1e-4, errors


def test_auto_kernels_on_a_cpu_take_the_pytorch_path():
    from convneur_mm.models.layers import NeuralMemory
    torch.manual_seed(0)
    auto = NeuralMemory(16, chunk_size=8, kernels='auto', matmul_dtype='float16').eval()
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        plan = auto.plan(x)
        assert plan.implementation == 'torch' and 'CUDA' in plan.reason, plan
        out = auto(x)
        auto.kernels = 'torch'
        torch.testing.assert_close(out, auto(x), rtol=0, atol=0)


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'),
                    reason='this process runs Triton in its interpreter')
def test_triton_kernels_on_a_cpu_without_the_interpreter_are_an_error():
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(16, chunk_size=8, kernels='triton').eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="kernels='triton'.*(CUDA|triton)"):
        memory(torch.randn(2, 20, 16))
    with pytest.raises(RuntimeError, match="kernels='triton'.*(CUDA|triton)"):
        memory.train()(torch.randn(2, 20, 16))  # training too: the Triton reads


def test_read_past_4096_rows_reads_every_row(interpreted):
    result = interpreted['read_past_4096_rows']
    assert result['finite'] and result['exact'] < F32_TOL, result


def test_triton_decomposed_read_keeps_small_updates(interpreted):
    # W_t = a_t W_0 + dW_t with dW 0.2% of the state: 16-bit operands on the
    # whole state lose ~10% of the update's contribution; a_t (x @ W_0) at
    # float32 accuracy plus x @ dW in 16 bits keeps it
    assert interpreted['decomposed_f32']['exact'] < F32_TOL
    assert interpreted['decomposed_read_chunks_f32']['exact'] < F32_TOL
    f16 = interpreted['decomposed_f16']
    assert f16['update'] < 1e-2 < f16['naive_update']


def test_float16_emulation_tells_operand_rounding_apart():
    # the emulated check is only worth its tolerance if float16 rounding moves
    # the result far more than it: exact and emulated references must differ
    w, keys, values, token_lr = _write_inputs(2, 3, 24, 24, 1.0, seed=24)
    exact = _grads64(w, keys, values, token_lr, _identity)
    half = _grads64(w, keys, values, token_lr, _half)
    assert min(_norm_err(a, b) for a, b in zip(half[:2], exact[:2])) > 5 * F16_EMULATED_TOL
    ref = chunk_grads_torch(w.map(torch.Tensor.double), keys.double(), values.double(),
                       token_lr.double())
    for a, b in zip(exact, ref):  # the emulation's maths is memory_grads'
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _meta_projections(groups=2, images=3, chunks=2, length=24, d=16):
    """Keys, values and step sizes as views of one (B, N, groups, 2d + 1)
    projection of B images, cut to their U written chunks, on tensors
    without data; and weights."""
    n = chunks * length + 5
    proj = torch.empty(images, n, groups, 2 * d + 1, device='meta')
    written = proj[:, :chunks * length].permute(2, 0, 1, 3).unflatten(2, (chunks, length))
    w = MemoryWeights(torch.empty(groups, d, 4 * d, device='meta'),
                      torch.empty(groups, 4 * d, d, device='meta'),
                      torch.empty(groups, d, device='meta'))
    return w, written[..., :d], written[..., d:2 * d], written[..., 2 * d]


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_triton_implementations_allocate_their_results_and_scratch_only():
    """The wrappers read their arguments where they lie: what they allocate
    (counted on meta tensors, launches skipped) is their results, the
    gradients' documented scratch (the (tokens, d) gradient at the MLP's
    output and, with 16-bit operands, the keys, both in the operand dtype,
    and the per-row-block sums of d_g) and one cast of the weights to 16-bit
    operands (broadcast states cast once); a copy of an argument would add
    its bytes."""
    w, keys, values, token_lr = _meta_projections()
    groups, images, chunks, length, d = keys.shape
    cast = (w.w1.numel() + w.w2.numel()) * 2
    with torch.no_grad(), kernels.without_launches():
        with LiveTensorBytes() as live:
            grads = chunk_grads_triton(w, keys, values, token_lr, torch.float16)
        row_blocks = -(-length // kernel_tiles.tile_config('grads_rows', d, length, None, None,
                                                     torch.float16)['BM'])
        # the gradient at the MLP's output and the keys in the operand dtype, d_g's
        # shares in float32 (24-row chunks in 32-row blocks: one block per chunk)
        scratch = groups * images * chunks * (length * 2 * 2 + row_blocks * 4) * d
        assert [list(t.shape) for t in grads] == [[groups, images * chunks, d, 4 * d],
                                                  [groups, images * chunks, 4 * d, d],
                                                  [groups, images * chunks, d]]
        assert live.peak == _nbytes(*grads) + scratch + cast

        states = MemoryWeights(*(t[:, None, None].expand(groups, images, chunks, *t.shape[1:])
                                 for t in w))
        queries = keys.flatten(2, 3)[:, :, :chunks * length - 3]  # a partial last chunk
        with LiveTensorBytes() as live:
            out = chunk_read_triton(states, queries, length, torch.float16)
        assert live.peak == _nbytes(out) + cast
        with LiveTensorBytes() as live:
            out = read_triton(w, keys[:, 0, 0], torch.float16)
        assert live.peak == _nbytes(out) + cast
        with LiveTensorBytes() as live:  # float32 operands: nothing to cast
            out = read_triton(w, keys[:, 0, 0], torch.float32)
        assert live.peak == _nbytes(out)


def test_without_launches_lets_a_memory_plan_the_triton_kernels_anywhere():
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(16, chunk_size=8, kernels='triton').eval().to('meta')
    x = torch.empty(2, 20, 16, device='meta')
    with torch.no_grad(), kernels.without_launches():
        assert memory.plan(x).implementation == 'triton'
        assert memory(x).shape == x.shape
    assert not kernels.availability.launches_skipped()  # the context is closed


def test_the_projection_kernels_serve_kernels_triton():
    """kernels='triton' projects with its kernel up to width 256 in
    inference and in training up to 128 and at M4's 160 (its backward's
    widths), and scans with
    its kernel in inference and training; 'auto' (untimed) and wider
    memories project in PyTorch, and a hook on a layer calls the layers."""
    from convneur_mm.models.layers import NeuralMemory
    x = torch.empty(2, 20, 16, device='meta')

    def projections(memory, x=x, grad=False):
        with torch.set_grad_enabled(grad), kernels.without_launches():
            return memory.plan(x).projections

    memory = NeuralMemory(16, chunk_size=8, kernels='triton').to('meta')
    assert projections(memory) == 'triton'
    assert projections(memory, grad=True) == 'triton'
    m4 = NeuralMemory(160, chunk_size=8, kernels='triton').to('meta')
    x160 = torch.empty(2, 20, 160, device='meta')
    assert projections(m4, x160) == 'triton'
    assert projections(m4, x160, grad=True) == 'triton'
    for d in (144, 192):
        wider = NeuralMemory(d, chunk_size=8, kernels='triton').to('meta')
        x_wider = torch.empty(2, 20, d, device='meta')
        assert (projections(wider, x_wider), projections(wider, x_wider, grad=True)) == (
            'triton', 'torch')
    with torch.no_grad(), kernels.without_launches():
        assert memory.plan(x).scan == 'triton'
    with kernels.without_launches():  # training: the scan kernel has a backward
        assert memory.plan(x).scan == 'triton'
    memory.kernels = 'auto'
    with torch.no_grad(), kernels.without_launches():
        assert memory.plan(x).scan == 'torch'  # untimed: 'auto' scans by products
    assert projections(memory) == 'torch'
    wide = NeuralMemory(512, heads=2, chunk_size=8, kernels='triton').to('meta')
    assert projections(wide, torch.empty(2, 20, 512, device='meta')) == 'torch'
    memory.kernels = 'triton'
    memory.to_values.register_forward_hook(lambda *args: None)
    assert projections(memory) == 'layers'


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'),
                    reason='this process runs Triton in its interpreter')
def test_kernels_refuse_a_cpu_without_the_interpreter():
    assert not kernels.kernels_available('cpu')
    reason = kernels.unavailable_reason('cpu')
    assert 'TRITON_INTERPRET' in reason or 'triton' in reason
    w, keys, values, token_lr = _write_inputs(1, 2, 8, 16, 1.0, seed=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match='cannot run'):
        chunk_grads_triton(w, keys, values, token_lr)


def test_kernels_check_their_inputs():
    w, keys, values, token_lr = _write_inputs(1, 2, 8, 16, 1.0, seed=0)
    got = chunk_grads_triton
    with pytest.raises(ValueError, match='values has size 7'):
        got(w, keys, values[:, :, :7], token_lr)
    with pytest.raises(ValueError, match='weights.w2'):
        got(w._replace(w2=w.w2[:, :32]), keys, values, token_lr)
    with pytest.raises(TypeError, match='float32 tensors; keys is torch.float64'):
        got(w, keys.double(), values, token_lr)
    with pytest.raises(ValueError, match='operand_dtype'):
        got(w, keys, values, token_lr, torch.float64)
    with pytest.raises(ValueError, match='power of two'):
        read_triton(w, keys[:, 0], block_rows=24)
    with pytest.raises(ValueError, match='both base and carry'):
        read_triton(w, keys[:, 0], base=w)
    states = w.map(lambda t: t[None, :, None])  # (H=1, B=1, C=1, ...)
    with pytest.raises(ValueError, match='need 2 chunk states'):
        chunk_read_triton(states, torch.randn(1, 1, 9, 16), 8)
    assert 'range' in kernels.unavailable_reason('cpu', head_dim=512)
    assert not kernels.kernels_available('cpu', head_dim=512)


def test_tile_span_check_bounds_the_rows_not_the_outer_dims():
    """Outer dims are addressed by int64 base offsets: a batch of 128 images at
    stage 1 (a group stride of 48M elements) must pass; a chunk whose rows
    alone span 2**31 elements must not. Meta tensors: no memory is allocated."""
    check_span = kernel_ops.check_span

    def meta(shape, strides):
        return torch.empty_strided(shape, strides, device='meta')

    keys = meta((2, 1920, 196, 128), (48168960, 25088, 128, 1))
    check_span('keys', 196, keys)
    check_span('token_lr', 196, meta((2, 1920, 196), (376320, 196, 1)), row_dim=-1)
    check_span('x', 4096, meta((1, 128, 50176, 128), (2**33, 6422528, 128, 1)))
    with pytest.raises(ValueError, match='x: a chunk of 4096 rows .* spans more than 2\\*\\*31'):
        check_span('x', 4096, meta((1, 2, 4096, 8), (2**32, 2**30, 2**19, 1)))
    with pytest.raises(ValueError, match='token_lr'):
        check_span('token_lr', 196, meta((1, 2, 196), (2**40, 2**32, 2**24)), row_dim=-1)


def _inspect():
    """``kernels.inspect`` where this process can compile for a GPU ahead of
    time (triton ships ptxas), else a skip."""
    pytest.importorskip('triton')
    if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        pytest.skip('this process runs Triton in its interpreter')
    from convneur_mm.models.layers.memory_ops.kernels import inspect
    try:
        inspect._triton()
    except RuntimeError as err:
        pytest.skip(str(err))
    return inspect


def _stage_launches(d: int, operand_dtype: torch.dtype, arch: int, batch: int = 128,
                    tokens: int = 3136, max_lr: float = 1.0):
    """The launches a ``NeuralMemory`` of width ``d`` makes at a stage of
    ``tokens`` tokens (M3's stage 1 by default), recorded on meta tensors:
    the GPU code path, which the interpreter never sees, compiled as it
    launches."""
    inspect = _inspect()
    from convneur_mm.models.layers import NeuralMemory
    dtype = str(operand_dtype).split('.')[-1]
    memory = NeuralMemory(d, chunk_size=196, max_lr=max_lr, kernels='triton',
                          matmul_dtype=dtype).eval().to('meta')
    with torch.no_grad(), inspect.recording_launches(arch) as launches:
        memory(torch.empty(batch, tokens, d, device='meta'))
    return inspect, launches


def _compile_stage(d: int, operand_dtype: torch.dtype, arch: int, **stage):
    inspect, launches = _stage_launches(d, operand_dtype, arch, **stage)
    reports = inspect.launch_reports(launches, arch)
    for report in reports:
        # an A100's limit per block (an H100 allows 227 KiB)
        assert report.shared <= 163 * 1024, report
    return reports


# the product kernels, launched once each; the scan's runs once per weight tensor
KERNEL_NAMES = ['grads_rows_kernel', 'grads_cols_kernel', 'read_kernel', 'project_kernel']
SCAN_LAUNCHES = ['scan_kernel'] * 3


# float16 on sm_90 is a `slow` case: its tiles are bf16's
@pytest.mark.parametrize('operand_dtype,arch', [
    (torch.bfloat16, 90), pytest.param(torch.float16, 90, marks=pytest.mark.slow),
    (torch.bfloat16, 80)])
def test_kernels_compile_as_launched_at_m3_stage_1(operand_dtype, arch):
    """M3's stage 1 (batch 128, 3136 tokens, C_m 128, chunks of 196) as the
    wrappers launch it: no spills, and Hopper's wgmma on sm_90 (but for the
    projections); 16-bit weights everywhere, the scan writing w1's and w2's
    states in 16 bits for the read."""
    inspect, launches = _stage_launches(128, operand_dtype, arch)
    assert sorted(launch.kernel.__name__ for launch in launches) == sorted(
        KERNEL_NAMES + SCAN_LAUNCHES + ['read_kernel'])
    # 16 chunks of 196 rows: three 64-row blocks each, then 16 rows for their last 4
    reads = [x for x in launches if x.kernel.__name__ == 'read_kernel']
    assert [(x.kwargs['BM'], x.grid) for x in reads] == [(64, (128 * 16 * 3, )),
                                                         (16, (128 * 16, ))]
    half = '*bf16' if operand_dtype == torch.bfloat16 else '*fp16'
    states = []
    for launched in launches:
        signature, constants, attrs, _ = inspect.launch_specialization(launched, arch)
        # the launch's own specialization: divisibility hints, 16-bit weights
        name = launched.kernel.__name__
        assert attrs, name
        if name == 'scan_kernel':
            states.append(signature['out_ptr'])
        else:
            assert signature['w_ptr' if name == 'project_kernel' else 'w1_ptr'] == half, name
        if name == 'grads_cols_kernel':  # the rows pass's 16-bit copy of the keys
            assert signature['k_ptr'] == half
        if name == 'grads_rows_kernel':  # 46 blocks over each image's 2940 written rows
            assert launched.kwargs['FLAT'] and launched.grid == (128 * 46, )
    assert states == [half, half, '*fp32']  # w1, w2, g
    reports = inspect.launch_reports(launches, arch)
    assert {r.kernel for r in reports} == set(KERNEL_NAMES + SCAN_LAUNCHES)
    for report in reports:
        assert report.shared <= 163 * 1024 and report.spill_stores == 0, report
        if report.kernel in ('scan_kernel', 'read_kernel'):
            continue  # element-wise; the reads below
        # the projections' 32-row tiles (64 spill) are below wgmma's least
        wgmma = arch >= 90 and report.kernel != 'project_kernel'
        assert (report.wgmma > 0) == wgmma and report.mma != 'none', report
    # the read's 16-row blocks are below wgmma's least
    assert sorted(r.wgmma > 0 for r in reports if r.kernel == 'read_kernel') == [False,
                                                                                 arch >= 90]


# float16 on sm_80 is a `slow` case: the forward's sm_80 case covers mma.sync
@pytest.mark.parametrize('operand_dtype,arch', [
    (torch.bfloat16, 90), pytest.param(torch.float16, 80, marks=pytest.mark.slow)])
def test_backward_kernels_compile_as_launched_at_m3_stage_1(operand_dtype, arch):
    """The chunk read's, the chunk gradients' and the scan's backward at M3's
    stage 1 (batch 128, 16 chunks of 196 tokens, C_m 128; the keys as the
    projections' per-image views) as their wrappers launch them: no spills,
    tensor-core products, and wgmma for the read's columns pass on sm_90 (the write's rows
    pass takes 16-row tiles, below wgmma's 64, to hold its tiles without
    spilling). The projections' backward spills a few hundred bytes at its
    least-spilling tiles (``projection_tiles``): bounded here, not zero."""
    from convneur_mm.models.layers.memory_ops.chunk_grads.triton import _chunk_grads_backward
    from convneur_mm.models.layers.memory_ops.project.triton import _project_backward
    from convneur_mm.models.layers.memory_ops.scan.triton import _scan_backward
    inspect = _inspect()
    heads, batch, chunks, length, d = 1, 128, 16, 196, 128
    meta = dict(device='meta')
    empty = lambda *shape: torch.empty(*shape, **meta)  # noqa: E731
    states = MemoryWeights(empty(heads, batch, chunks, d, 4 * d),
                           empty(heads, batch, chunks, 4 * d, d), empty(heads, batch, chunks, d))
    merged = lambda: empty(batch, chunks * length, heads * d).view(  # noqa: E731
        batch, -1, heads, d).permute(2, 0, 1, 3)
    proj = empty(batch, chunks * length, heads, 2 * d).permute(2, 0, 1, 3).unflatten(
        2, (chunks, length))
    token_lr = empty(batch, chunks * length, heads).permute(2, 0, 1).unflatten(2, (chunks, length))
    per_chunk = (heads, batch * chunks)
    with inspect.recording_launches(arch) as launches:
        launch_read_backward(states, merged(), merged(), merged(), length, operand_dtype,
                             None, None, None, None)
        _chunk_grads_backward(empty(heads, d, 4 * d), empty(heads, 4 * d, d), empty(heads, d),
                              proj[..., :d], proj[..., d:], token_lr,
                              empty(*per_chunk, d, 4 * d), empty(*per_chunk, 4 * d, d),
                              empty(*per_chunk, d), operand_dtype, None, None)
        # w1's scan: (H B, U, d 4d) gradients, U + 1 states
        rows, size = heads * batch, d * 4 * d
        _scan_backward(empty(rows, chunks - 1, size), empty(rows, chunks - 1),
                       empty(rows, chunks - 1), empty(rows, chunks - 1), empty(rows, size),
                       empty(rows, chunks, size), empty(rows, chunks, size))
        # the projections of 15 written chunks of the 16, cotangents as autograd gives them
        tokens, updates = (chunks - 1) * length, chunks - 1
        _project_backward(empty(batch, chunks * length, d), empty(4 * d + heads, d),
                          empty(d + heads), empty(2 * heads, d // heads),
                          empty(batch, updates, d), empty(batch, updates, d), merged(),
                          empty(heads, batch, tokens, d), empty(heads, batch, tokens, d),
                          empty(heads, batch, tokens), empty(batch, updates, d),
                          updates, length, 1.0, operand_dtype, None)
    cols = next(x for x in launches if x.kernel.__name__ == 'grads_backward_cols_kernel')
    half = '*bf16' if operand_dtype == torch.bfloat16 else '*fp16'
    # the rows pass's 16-bit copy of the keys
    assert inspect.launch_specialization(cols, arch)[0]['k_ptr'] == half
    # the read's rows pass: 64-row blocks (32 on sm_90, ``kernel_tiles.row_limit``),
    # then 16 rows for each chunk's last 4
    block = 32 if arch >= 90 else 64
    rows = [x for x in launches if x.kernel.__name__ == 'read_backward_rows_kernel']
    assert [(x.kwargs['BM'], x.grid) for x in rows] == [(block, (128 * 16 * (192 // block), )),
                                                        (16, (128 * 16, ))]
    reports = inspect.launch_reports(launches, arch)
    assert sorted(r.kernel for r in reports) == [
        'grads_backward_cols_kernel', 'grads_backward_rows_kernel', 'project_backward_kernel',
        'read_backward_cols_kernel', 'read_backward_rows_kernel', 'read_backward_rows_kernel',
        'scan_backward_kernel']
    for report in reports:
        spills = 384 if report.kernel == 'project_backward_kernel' else 0
        assert report.shared <= 163 * 1024 and report.spill_stores <= spills, report
        if report.kernel != 'scan_backward_kernel':  # element-wise
            assert report.mma != 'none', report
        if report.kernel == 'read_backward_cols_kernel':
            assert (report.wgmma > 0) == (arch >= 90), report
    # its 16- and 32-row blocks are below wgmma's least
    assert not any(r.wgmma for r in reports if r.kernel == 'read_backward_rows_kernel')


@pytest.mark.slow  # a flag's variant of the kernels the tests above compile
def test_the_tanh_form_of_gelu_compiles_as_launched_for_a_training_step():
    """``gelu_approximate='tanh'``: a training step of M3's stage-1 memory
    (forward and backward, bf16, sm_90) launches every GELU kernel with the
    tanh form, and each compiles without spills, on tensor cores."""
    inspect = _inspect()
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(128, chunk_size=196, kernels='triton', matmul_dtype='bfloat16',
                          gelu_approximate='tanh').train().to('meta')
    with inspect.recording_launches(90) as launches:
        memory(torch.empty(128, 3136, 128, device='meta', requires_grad=True)).sum().backward()
    gelu_kernels = ['grads_backward_cols_kernel', 'grads_backward_rows_kernel',
                    'grads_cols_kernel', 'grads_rows_kernel', 'read_backward_cols_kernel',
                    'read_backward_rows_kernel', 'read_kernel']
    gelu = [x for x in launches if x.kernel.__name__ in gelu_kernels]
    assert sorted({x.kernel.__name__ for x in gelu}) == gelu_kernels
    assert all(x.kwargs.get('GELU_TANH') is True for x in gelu)  # every launch of each
    assert not any('GELU_TANH' in x.kwargs for x in launches if x not in gelu)
    for report in inspect.launch_reports(gelu, 90):
        assert report.shared <= 163 * 1024 and report.spill_stores == 0, report
        assert report.mma != 'none', report


def test_compile_reports_tell_specializations_apart():
    """A kernel compiled without its launch's hints differs from the launch's:
    the report sees what a hand-written signature would miss."""
    inspect, launches = _stage_launches(128, torch.bfloat16, 90)
    launch = next(x for x in launches if x.kernel.__name__ == 'grads_rows_kernel')
    signature, constants, attrs, options = inspect.launch_specialization(launch, 90)
    launched = inspect.compile_for(90, launch.kernel, signature, constants, attrs, options)
    plain = inspect.compile_for(90, launch.kernel, signature, constants, None, options)
    assert (launched.registers, launched.spill_stores) != (plain.registers, plain.spill_stores)


@pytest.mark.slow
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('d', [80, 160])
@pytest.mark.parametrize('operand_dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_compile_for_every_width_and_dtype(arch, d, operand_dtype):
    reports = _compile_stage(d, operand_dtype, arch, batch=2, tokens=784)
    assert {r.kernel for r in reports} == set(KERNEL_NAMES + SCAN_LAUNCHES)
    if operand_dtype != torch.float32:  # max_lr 1e-3: the decomposed read
        reports = _compile_stage(d, operand_dtype, arch, batch=2, tokens=784, max_lr=1e-3)
        assert 'read_kernel' in [r.kernel for r in reports]


@pytest.mark.gpu
def test_auto_kernels_serve_cuda_inference_in_bfloat16_where_measured():
    from convneur_mm.models.layers import NeuralMemory
    torch.manual_seed(0)
    memory = NeuralMemory(128, chunk_size=196, kernels='auto').cuda().eval()
    x = torch.randn(4, 784, 128, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        plan = memory.plan(x)
        out = memory(x)
        memory.kernels = 'torch'
        ref = memory(x)
    # the kernels where a GPU of this kind measured them faster (an H100 or H200)
    from convneur_mm.models.layers.memory_ops.dispatch import auto_path
    major, minor = torch.cuda.get_device_capability()
    expected = auto_path(major * 10 + minor, 'bfloat16', False, 128)[0]
    assert plan.implementation == expected and plan.operand_dtype == torch.bfloat16, plan
    assert _rel_err(out.cpu(), ref.double().cpu()) < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize('d', [80, 128, 160])
def test_triton_kernels_on_cuda_at_model_widths(d):
    """The compiled kernels at M1..M4 widths, L = 196, every operand dtype,
    the chunk gradients in both layouts."""
    torch.manual_seed(d)
    w, keys, values, token_lr = _write_inputs(2, 3, 196, d, 1.0, seed=d)
    exact_grads = chunk_grads_torch(w.map(torch.Tensor.double), keys.double(), values.double(),
                               token_lr.double())
    x = torch.randn(2, 300, d)
    exact_read = read_torch(w.map(torch.Tensor.double), x.double())
    cuda = torch.device('cuda')
    w_cuda = w.map(lambda t: t.to(cuda))
    tolerances = {torch.float32: F32_TOL, torch.float16: F16_TOL, torch.bfloat16: BF16_TOL}
    with torch.no_grad():
        for (dtype, tol), (layout, chosen) in itertools.product(tolerances.items(), LAYOUTS):
            with chosen():  # one program per chunk: its own stores read back past a barrier
                grads = chunk_grads_triton(
                    w_cuda, keys.to(cuda), values.to(cuda), token_lr.to(cuda), dtype)
            for a, b in zip(grads, exact_grads):
                assert _rel_err(a.cpu(), b) < tol, (dtype, layout, a.shape)
            read = read_triton(w_cuda, x.to(cuda), dtype)
            assert _rel_err(read.cpu(), exact_read) < tol, dtype
        decomposed = _decomposed_results(torch.Generator().manual_seed(d), 'cuda',
                                         (('f32', torch.float32), ('bf16', torch.bfloat16)))
    assert decomposed['decomposed_f32']['exact'] < F32_TOL
    assert decomposed['decomposed_read_chunks_f32']['exact'] < F32_TOL
    bf16 = decomposed['decomposed_bf16']
    assert bf16['update'] < 2e-2 < bf16['naive_update']


@pytest.mark.gpu
@pytest.mark.parametrize('d,heads', [(80, 1), (128, 1), (128, 4), (160, 1)])
def test_triton_projections_on_cuda(d, heads):
    """The compiled projection kernel at M1, M3 and M4 widths, 3136 tokens in
    chunks of 196, every operand dtype, against each layer in float64."""
    from convneur_mm.models.layers.memory_ops.project import (ProjectionWeights, project_naive,
                                                              project_triton, projection_shapes)
    gen = torch.Generator().manual_seed(d)
    weights = ProjectionWeights(*(torch.randn(*shape, generator=gen) * 0.5
                                  for shape in projection_shapes(d, heads)))
    x = torch.randn(2, 3136, d, generator=gen)
    ref = project_naive(x.double(), ProjectionWeights(*(t.double() for t in weights)), 15, 196,
                        1.0)
    on_cuda = ProjectionWeights(*(t.cuda() for t in weights))
    tolerances = {torch.float32: F32_TOL, torch.float16: F16_TOL, torch.bfloat16: BF16_TOL}
    with torch.no_grad():
        for dtype, tol in tolerances.items():
            got = project_triton(x.cuda(), on_cuda, 15, 196, 1.0, dtype)
            for name, a, b in zip(got._fields, got, ref):
                assert _rel_err(a.cpu(), b) < tol, (dtype, name)


@pytest.mark.gpu(count=2)
def test_the_kernels_launch_on_the_memorys_gpu_not_the_current_one():
    """A memory on cuda:1 while cuda:0 is current (``init_detector(...,
    device='cuda:1')``): Triton launches on the current device unless the
    operators make the tensors' one current."""
    import copy
    from convneur_mm.models.layers import NeuralMemory
    torch.manual_seed(0)
    memory = NeuralMemory(128, chunk_size=196, kernels='triton').eval()
    x = torch.randn(2, 784, 128)
    reference = copy.deepcopy(memory).double()
    reference.kernels = 'torch'
    torch.cuda.set_device(0)
    with torch.no_grad():
        out = memory.to('cuda:1')(x.to('cuda:1'))
        want = reference(x.double())
    assert out.device == torch.device('cuda:1')
    assert _rel_err(out.cpu(), want) < F32_TOL


if __name__ == '__main__':  # the interpreter subprocess of ``_run_interpreted``
    interpreted_runs.main(globals())
