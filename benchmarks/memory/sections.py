"""The sections of the neural memory's GPU benchmark (``memory_suite``), each
a function of the suite that returns its JSON record:

* ``gemm``: the memory's own matrix products at their real shapes (stage 1 of
  ConvNeur-M3): float32, TF32, bf16 (bf16 output) and bf16 operands with a
  float32 output; TFLOP/s of the median call.
* ``branch``: the four global branches of M3 alone, on the inputs they get:
  each memory variant's (``memory_variants.BRANCH_VARIANTS``) time, peak
  memory growth and error against float32.
* ``model``: M3 against M3 local-only, called in turns, float32 and bf16
  autocast, eager: throughput, the branches' time per batch, peak growth;
  and a bf16 training step of each (forward, backward, AdamW).
* ``numerics``: logits against float32 and float64; the memory of stage 1
  against float64 per variant, with the update-contribution error at
  ``max_lr`` 1, 0.2 and 1e-3.
* ``latency``: batch 1, eager and replayed from a captured CUDA graph.
* ``compiled``: ``model`` again with backbone and head through
  ``torch.compile``; on CUDA also M3 with ``kernels='triton'`` under bf16.
* ``profile``: ``kernel_profile``'s cases (the branches' inference with
  the Triton kernels and with the PyTorch path, their bf16 training steps):
  device time per kernel name beside its roofline. Not a default section.

Every item asks the suite whether it still fits the time budget first and
records ``skipped: <reason>`` where not; an item that fails records
``error: <reason>`` and the section goes on.
"""
import copy
import time
import traceback
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import torch

from convneur_mm.analysis.timing import (PeakMemoryGrowth, time_call, time_calls,
                                            time_in_turns)
from benchmarks.common.memory_models import (build_classifier, graph_breaks, graph_latency,
                                                hooked_inputs, logits_fn)
from benchmarks.common.subjects import (BRANCH_VARIANTS, MAX_LRS, MODEL_VARIANTS,
                                                  NEEDS_CUDA, NUMERICS_VARIANTS, TRAINING_MODE,
                                                  backbone_memory_keys, branch_like,
                                                  describe_error, free, gemm_shapes, median_ms,
                                                  memory_like, precision, relative_error,
                                                  unsupported)
from convneur_mm.engine.compile import compile_model, graphs_compiled

if TYPE_CHECKING:
    from benchmarks.memory.suite import MemorySuite


def section_gemm(ctx: 'MemorySuite') -> Dict:
    memory = ctx.m3_branches[0].memory
    rows = []
    out_dtype_overload = hasattr(torch.ops.aten.bmm, 'dtype')
    for name, (groups, m, k, n) in gemm_shapes(memory, ctx.sizes['batch'],
                                               ctx.stage1_tokens).items():
        a32 = torch.randn(groups, m, k, device=ctx.device)
        b32 = torch.randn(groups, k, n, device=ctx.device)
        for prec in ('float32', 'tf32', 'bf16', 'bf16_float32_out'):
            row = dict(product=name, groups=groups, m=m, k=k, n=n, precision=prec)
            rows.append(row)
            if prec == 'tf32' and not ctx.cuda:
                row['status'] = NEEDS_CUDA
                continue
            if prec == 'bf16_float32_out' and not (out_dtype_overload and ctx.cuda):
                row['status'] = ('skipped: no bmm(..., out_dtype) in this torch'
                                 if not out_dtype_overload else
                                 'skipped: needs CUDA (bmm out_dtype is a CUDA kernel)')
                continue
            try:
                a, b = (a32, b32) if prec in ('float32', 'tf32') else (
                    a32.bfloat16(), b32.bfloat16())
                if prec == 'bf16_float32_out':
                    fn = lambda a=a, b=b: torch.ops.aten.bmm.dtype(a, b, torch.float32)  # noqa
                else:
                    fn = lambda a=a, b=b: torch.bmm(a, b)  # noqa: E731
                with precision('tf32' if prec == 'tf32' else None, ctx.device):
                    times = time_calls(fn, ctx.sizes['iters'], ctx.device,
                                       warmup=ctx.sizes['warmup'])
                ms = median_ms(times)
                row.update(status='ok', ms=ms, tflops=2 * groups * m * k * n / (ms * 1e-3) / 1e12)
            except Exception as exc:  # noqa: BLE001
                row['status'] = describe_error(exc)
        del a32, b32
        free(ctx.device)
    return dict(rows=rows, note='operands larger than the L2 cache at batch 128; '
                'median of the timed calls; TF32 off except in the tf32 rows')


def section_branch(ctx: 'MemorySuite') -> Dict:
    rows = {}
    inputs = ctx.branch_inputs
    baseline: Optional[List[torch.Tensor]] = None
    for name, (cfg, context, training, cuda_only) in BRANCH_VARIANTS.items():
        row = dict(memory_cfg=cfg, context=context, training=training)
        rows[name] = row
        why = (NEEDS_CUDA if cuda_only and not ctx.cuda else
               unsupported(cfg, ctx.memory_keys) or
               ctx.why_not('branch_variant'))
        if why:
            row['status'] = why
            continue
        start = time.monotonic()
        try:
            branches = [branch_like(b, cfg).train(training) for b in ctx.m3_branches]

            if training:
                params = [p for b in branches for p in b.parameters()]

                def call():
                    for p in params:
                        p.grad = None
                    with precision(context, ctx.device):
                        loss = sum(b(t).float().sum() for b, t in zip(branches, inputs))
                    loss.backward()
            else:
                def call():
                    with torch.inference_mode(), precision(context, ctx.device):
                        for b, t in zip(branches, inputs):
                            b(t)

            if not training:  # outputs first: the check is worth more than the time
                with torch.inference_mode(), precision(context, ctx.device):
                    outs = [b(t).float() for b, t in zip(branches, inputs)]
                if name == 'float32':
                    baseline = outs
                row['error_vs_float32'] = (relative_error(outs, baseline)
                                           if baseline is not None else None)
                del outs
            for _ in range(ctx.sizes['warmup']):  # Triton's compilation, cuBLAS handles
                call()
            window = PeakMemoryGrowth(ctx.device)
            call()
            row['peak_growth_mib'] = window.mib()
            times = time_calls(call, ctx.sizes['iters'], ctx.device, warmup=0)
            row.update(status='ok', ms=median_ms(times), ms_all=[t * 1e3 for t in times])
            ctx.measured('branch_variant', start)
        except Exception as exc:  # noqa: BLE001
            row['status'] = describe_error(exc)
            ctx.log(traceback.format_exc())
        free(ctx.device)
        ctx.checkpoint(dict(rows=rows))
    return dict(rows=rows, batch=ctx.sizes['batch'],
                note='the four global branches of M3 on the inputs they get in one forward; '
                'ms per call of all four; training rows are forward + backward')


def _model_rows(ctx: 'MemorySuite', models: Dict[str, torch.nn.Module], modes: Sequence[str],
                compiled: bool, checkpoint: Callable[[Dict], None]) -> Dict:
    """Each mode's figures of ``models`` (M3 and local-only, called in turns);
    ``checkpoint(rows)`` after each mode saves what is done so far."""
    batch = ctx.sizes['batch']
    x = torch.randn(batch, 3, ctx.sizes['image'], ctx.sizes['image'], device=ctx.device)
    out: Dict = {}
    for mode in modes:
        kind = 'compiled_mode' if compiled else 'model'
        why = ctx.why_not(kind)
        if why:
            out[mode] = dict(status=why)
            continue
        start = time.monotonic()
        try:
            fns = {name: _step(model, x, mode, ctx.device) for name, model in models.items()}
            rec = {}
            for name, fn in fns.items():  # the first call: compilation where compiled
                rec[name] = dict(first_call_s=time_call(fn, ctx.device))
                window = PeakMemoryGrowth(ctx.device)
                fn()
                rec[name]['peak_growth_mib'] = window.mib()
            times = time_in_turns(fns, ctx.sizes['rounds'], ctx.device, ctx.sizes['warmup'])
            for name, seconds in times.items():
                ms = median_ms(seconds)
                rec[name].update(ms=ms, images_per_s=batch / (ms * 1e-3),
                                 ms_all=[t * 1e3 for t in seconds])
            m3, local = rec['M3']['ms'], rec['M3 local-only']['ms']
            out[mode] = dict(status='ok', models=rec, branches_ms=m3 - local,
                             overhead_over_local=(m3 - local) / local)
        except Exception as exc:  # noqa: BLE001
            out[mode] = dict(status=describe_error(exc))
            ctx.log(traceback.format_exc())
        ctx.measured(kind, start)
        free(ctx.device)
        checkpoint(out)
    return out


def _step(model: torch.nn.Module, x: torch.Tensor, mode: str,
          device: str) -> Callable[[], object]:
    """One call of ``mode`` on ``model``: inference (``float32``,
    ``bf16_autocast``), or with ``TRAINING_MODE`` a training step of a copy
    of it (forward under bf16 autocast, cross-entropy, backward, AdamW),
    so that the shared models keep their weights."""
    context = 'bf16' if mode.endswith('bf16_autocast') else None
    if mode != TRAINING_MODE:
        def infer():
            with torch.inference_mode(), precision(context, device):
                return logits_fn(model)(x)
        return infer
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, model.head.num_classes, (x.shape[0], ), device=device)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with precision(context, device):
            logits = logits_fn(model)(x)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
    return train


def section_model(ctx: 'MemorySuite') -> Dict:
    models = {'M3': ctx.m3, 'M3 local-only': ctx.local_only}
    # the training step last: the targets' inference rows first, within the budget
    rows = _model_rows(ctx, models, ('float32', 'bf16_autocast', TRAINING_MODE), compiled=False,
                       checkpoint=lambda rows: ctx.checkpoint(dict(modes=rows)))
    variants: Dict = {}
    for name, cfg in MODEL_VARIANTS.items():
        why = (unsupported(cfg, ctx.memory_keys) or
               unsupported(cfg, backbone_memory_keys(), "the backbone's memory_cfg") or
               ctx.why_not('model'))
        if why:
            variants[name] = dict(status=why)
            continue
        try:
            model = build_classifier(ctx.device, ctx.sizes['chunk_size'],
                                     {f'model.backbone.memory_cfg.{k}': v
                                      for k, v in cfg.items()})
            model.load_state_dict(ctx.m3.state_dict())
            variants[name] = _model_rows(
                ctx, {'M3': model, 'M3 local-only': ctx.local_only},
                ('float32', 'bf16_autocast'), compiled=False,
                checkpoint=lambda part: ctx.checkpoint(dict(modes=rows,
                                                            variants={**variants, name: part})))
            variants[name]['memory_cfg'] = cfg
            del model
        except Exception as exc:  # noqa: BLE001
            variants[name] = dict(status=describe_error(exc))
            ctx.log(traceback.format_exc())
        free(ctx.device)
    return dict(batch=ctx.sizes['batch'], image=ctx.sizes['image'], modes=rows,
                variants=variants, note='M3 and local-only called in turns; median ms per '
                f'batch; peak growth over weights and input; {TRAINING_MODE}: a training step '
                '(forward under bf16 autocast, cross-entropy, backward, AdamW) of copies')


def section_compiled(ctx: 'MemorySuite') -> Dict:
    backend = 'inductor' if ctx.cuda else 'eager'
    why = ctx.why_not('compiled_mode')
    if why:
        return dict(status=why)
    # bf16 first: the targets are bf16's, and the budget may end before float32.
    # A dry run traces one mode: tracing M3 takes most of its time on a CPU
    modes = ('float32', ) if ctx.dry else ('bf16_autocast', 'float32')
    rows: Dict = {}
    for mode in modes:
        # a run compiles for one precision: an empty Dynamo cache and fresh
        # copies per mode, so that one mode's graphs do not use up the other's
        # recompile limit (then the rest runs eager)
        torch._dynamo.reset()
        models = {'M3': copy.deepcopy(ctx.m3), 'M3 local-only': copy.deepcopy(ctx.local_only)}
        for model in models.values():
            compile_model(model, backend=backend)
        before = graphs_compiled()
        rows.update(_model_rows(ctx, models, (mode, ), compiled=True, checkpoint=lambda part:
                                ctx.checkpoint(dict(backend=backend, modes={**rows, **part}))))
        if rows[mode]['status'] == 'ok':
            rows[mode]['graphs'] = graphs_compiled() - before
            rows[mode]['graph_breaks'] = graph_breaks(
                ctx.m3.backbone, torch.randn(2, 3, ctx.sizes['image'], ctx.sizes['image'],
                                             device=ctx.device),
                'bf16' if mode == 'bf16_autocast' else None, ctx.device)
        if mode == 'bf16_autocast' and ctx.cuda:
            rows['bf16_autocast kernels=triton'] = _compiled_kernels_rows(
                ctx, backend, models['M3 local-only'], lambda part: ctx.checkpoint(
                    dict(backend=backend, modes={**rows, 'bf16_autocast kernels=triton': part})))
        del models
        free(ctx.device)
    if ctx.dry:
        rows['bf16_autocast'] = dict(status='skipped: dry run (one traced mode checks the path)')
    return dict(backend=backend, mode='default', batch=ctx.sizes['batch'], modes=rows,
                note='convneur_mm.engine.compile.compile_model (backbone and head), compiled '
                'anew per mode; first_call_s includes the compilation; graphs: Dynamo graphs '
                'of both models (two each without breaks: backbone and head)')


def _compiled_kernels_rows(ctx: 'MemorySuite', backend: str, local_only: torch.nn.Module,
                           checkpoint: Callable[[Dict], None]) -> Dict:
    """M3 with ``kernels='triton'`` compiled (the kernels as custom operators
    in its graph) against the compiled local-only network already timed: the
    measurement by which ``'auto'`` may take the kernels under torch.compile."""
    try:
        model = build_classifier(ctx.device, ctx.sizes['chunk_size'],
                                 {'model.backbone.memory_cfg.kernels': 'triton'})
        model.load_state_dict(ctx.m3.state_dict())
        compile_model(model, backend=backend)
        row = _model_rows(ctx, {'M3': model, 'M3 local-only': local_only}, ('bf16_autocast', ),
                          compiled=True, checkpoint=lambda part: checkpoint(
                              part['bf16_autocast']))['bf16_autocast']
    except Exception as exc:  # noqa: BLE001
        row = dict(status=describe_error(exc))
        ctx.log(traceback.format_exc())
    return dict(row, memory_cfg=dict(kernels='triton'),
                note="the local-only network is the one compiled for the row before: its "
                "first_call_s is no compilation; no Dynamo reset between, so M3's own "
                "graphs count towards the backbone's recompile limit")


def _autocast_forward(model: torch.nn.Module, x: torch.Tensor,
                      bf16: bool) -> Callable[[], torch.Tensor]:
    # autocast's weight cache off: a captured CUDA graph would read freed casts
    def forward():
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16,
                                                    enabled=bf16, cache_enabled=False):
            return logits_fn(model)(x)
    return forward


def section_latency(ctx: 'MemorySuite') -> Dict:
    """Batch-1 latency of M3 and local-only, eager and from a CUDA graph."""
    if not ctx.cuda:
        return dict(status=NEEDS_CUDA)
    rows = {}
    x = torch.randn(1, 3, ctx.sizes['image'], ctx.sizes['image'], device=ctx.device)
    for mode in ('float32', 'bf16_autocast'):
        for name, model in (('M3', ctx.m3), ('M3 local-only', ctx.local_only)):
            key = f'{name} {mode}'
            why = ctx.why_not('latency')
            if why:
                rows[key] = dict(status=why)
                continue
            try:
                start = time.monotonic()
                rows[key] = graph_latency(_autocast_forward(model, x, mode == 'bf16_autocast'),
                                          ctx.sizes['latency_iters'], ctx.sizes['warmup'],
                                          ctx.device)
                ctx.measured('latency', start)
            except Exception as exc:  # noqa: BLE001
                rows[key] = dict(status=describe_error(exc))
                ctx.log(traceback.format_exc())
            free(ctx.device)
    for mode in ('float32', 'bf16_autocast'):
        m3, local = rows[f'M3 {mode}'], rows[f'M3 local-only {mode}']
        if m3.get('status') == 'ok' and local.get('status') == 'ok':
            rows[f'ratio {mode}'] = dict(status='ok', graph=m3['graph_ms'] / local['graph_ms'],
                                         eager=m3['eager_ms'] / local['eager_ms'])
    return dict(rows=rows, note='batch 1; graph: torch.cuda.CUDAGraph of the eager forward, '
                'replayed; eager: plain calls')


def section_numerics(ctx: 'MemorySuite') -> Dict:
    """Logits against float32 and float64; the stage-1 memory per variant
    against float64 at several ``max_lr``, with the update's contribution."""
    out: Dict = {}
    batch, image = ctx.sizes['numerics_batch'], ctx.sizes['image']
    gen = torch.Generator(device='cpu').manual_seed(0)
    x = torch.randn(batch, 3, image, image, generator=gen).to(ctx.device)
    why = ctx.why_not('numerics')
    if why:
        out['logits'] = dict(status=why)
    else:
        try:
            start = time.monotonic()
            out['logits'] = _logits_numerics(ctx, x)
            ctx.measured('numerics', start)
        except Exception as exc:  # noqa: BLE001
            out['logits'] = dict(status=describe_error(exc))
            ctx.log(traceback.format_exc())
    free(ctx.device)
    why = ctx.why_not('numerics')
    if why:
        out['memory'] = dict(status=why)
        return out
    try:
        branch = ctx.m3_branches[0]
        (tokens, ) = hooked_inputs(ctx.m3, x, [branch.memory])
        out['memory'] = _memory_numerics(ctx, branch.memory, tokens.float())
    except Exception as exc:  # noqa: BLE001
        out['memory'] = dict(status=describe_error(exc))
        ctx.log(traceback.format_exc())
    free(ctx.device)
    return out


def _logits_numerics(ctx: 'MemorySuite', x: torch.Tensor) -> Dict:
    with torch.inference_mode():
        ref64 = logits_fn(copy.deepcopy(ctx.m3).double())(x.double())
        f32 = logits_fn(ctx.m3)(x)
        rows = {'float32': dict(status='ok', error_vs_float64=relative_error([f32], [ref64]))}
        for mode in ('tf32', 'bf16'):
            if mode == 'tf32' and not ctx.cuda:
                rows[mode] = dict(status=NEEDS_CUDA)
                continue
            with precision(mode, ctx.device):
                got = logits_fn(ctx.m3)(x).float()
            rows[mode if mode == 'tf32' else 'bf16_autocast'] = dict(
                status='ok', error_vs_float32=relative_error([got], [f32]),
                error_vs_float64=relative_error([got], [ref64]))
    return dict(status='ok', batch=x.shape[0], rows=rows)


def _memory_numerics(ctx: 'MemorySuite', memory: torch.nn.Module, tokens: torch.Tensor) -> Dict:
    """Each variant's output and update contribution against float64. The
    W_0-only output is the same memory with one chunk as long as the input
    (nothing written, every token reads W_0); the update's contribution is
    the output minus it. ``update_error``: the variant's output minus the
    exact W_0-only output, against the exact contribution, i.e.
    ||out - out64|| / ||out64 - w0_64|| (whether the update survives the
    variant's rounding); ``update_error_own_w0`` subtracts the variant's own
    W_0-only output instead (its one-chunk read's error counts too)."""
    n = tokens.shape[1]
    rows: Dict = {}
    for max_lr in MAX_LRS:
        with torch.inference_mode():
            full64 = memory_like(memory, max_lr=max_lr).double()
            only64 = memory_like(memory, max_lr=max_lr, chunk_size=n).double()
            ref = full64(tokens.double())
            contribution = ref - only64(tokens.double())
        rows[f'max_lr={max_lr:g}'] = per_lr = dict(
            update_over_output=float(contribution.norm() / ref.norm()))
        for name in NUMERICS_VARIANTS:
            cfg, context, _, cuda_only = BRANCH_VARIANTS[name]
            why = (NEEDS_CUDA if cuda_only and not ctx.cuda else unsupported(cfg, ctx.memory_keys))
            if why:
                per_lr[name] = dict(status=why)
                continue
            try:
                with torch.inference_mode(), precision(context, ctx.device):
                    got = memory_like(memory, max_lr=max_lr, **cfg)(tokens).double()
                per_lr[name] = dict(
                    status='ok', output_error=relative_error([got], [ref]),
                    update_error=relative_error([got - (ref - contribution)], [contribution]))
                # for information only: a one-chunk read as long as the
                # image may be a shape the variant's kernels do not take
                try:
                    with torch.inference_mode(), precision(context, ctx.device):
                        w0 = memory_like(memory, max_lr=max_lr, chunk_size=n, **cfg)(tokens)
                    per_lr[name]['update_error_own_w0'] = relative_error(
                        [got - w0.double()], [contribution])
                except Exception as exc:  # noqa: BLE001
                    per_lr[name]['update_error_own_w0'] = describe_error(exc)
            except Exception as exc:  # noqa: BLE001
                per_lr[name] = dict(status=describe_error(exc))
                ctx.log(traceback.format_exc())
        del ref, contribution, full64, only64
        free(ctx.device)
    return dict(status='ok', tokens=list(tokens.shape), rows=rows)


def section_profile(ctx: 'MemorySuite') -> Dict:
    """The kernel profile of each of ``kernel_profile.CASES`` at the run's batch."""
    from benchmarks.kernels.profile import CASES, profile_case
    rows = {}
    for name in CASES:
        why = NEEDS_CUDA if 'triton' in name and not ctx.cuda else ctx.why_not('profile')
        if why:
            rows[name] = dict(status=why)
            continue
        try:
            start = time.monotonic()
            rows[name] = dict(profile_case(name, device=ctx.device, batch=ctx.sizes['batch'],
                                           size=ctx.sizes['image'],
                                           warmup=max(1, ctx.sizes['warmup'])), status='ok')
            ctx.measured('profile', start)
        except Exception as exc:  # noqa: BLE001
            rows[name] = dict(status=describe_error(exc))
            ctx.log(traceback.format_exc())
        free(ctx.device)
    return dict(rows=rows)


SECTION_FNS = dict(gemm=section_gemm, branch=section_branch, model=section_model,
                   numerics=section_numerics, latency=section_latency,
                   compiled=section_compiled, profile=section_profile)
