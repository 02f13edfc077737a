"""The neural memory's GPU benchmark (the ``memory`` case): its sections in
one run, one JSON record that is rewritten after every section (a run cut
short keeps what it measured), one time budget, and the memory's targets.

The budget is the run's deadline: before each item a section asks
``MemorySuite.why_not(kind)``, which compares the time left with what the
last item of that kind took, and records ``skipped: budget ...`` where it
would not fit. ``dry_run`` runs every section a CPU can run at tiny sizes
(batch 2, 32x32 images, chunks of 16 tokens so that stage 1 still writes, one
timed call; ``torch.compile`` with the ``eager`` backend, tracing only); the
CUDA-only items record ``skipped: needs CUDA``.

The sections, each a function of the suite that returns its JSON record:

* ``gemm``: the memory's own matrix products at their real shapes (stage 1 of
  ConvNeur-M3): float32, TF32, bf16 (bf16 output) and bf16 operands with a
  float32 output; TFLOP/s of the median call.
* ``branch``: the four global branches of M3 alone, on the inputs they get:
  each memory variant's (``subjects.BRANCH_VARIANTS``) time, peak
  memory growth and error against float32.
* ``model``: M3 against M3 local-only, called in turns, float32 and bf16
  autocast, eager: throughput, the branches' time per batch, peak growth;
  and a bf16 training step of each (forward, backward, AdamW).
* ``numerics``: logits against float32 and float64; the memory of stage 1
  against float64 per variant, with the update-contribution error at
  ``max_lr`` 1, 0.2 and 1e-3.
* ``latency``: batch 1, eager and replayed from a captured CUDA graph.
* ``compiled``: ``model`` again with backbone and head through
  ``torch.compile``, M3 on the PyTorch path; on CUDA also M3 with
  ``implementation='triton'`` under bf16, and from the two the
  ``MeasuredPath`` (``compiled=True``) by which 'auto' decides under
  torch.compile (``compiled_measured_path``).
* ``profile``: ``kernels.profile``'s cases (the branches' inference with
  the Triton kernels and with the PyTorch path, their bf16 training steps):
  device time per kernel name beside its roofline. Not a default section.

An item that fails records ``error: <reason>`` and the section goes on.
"""
import argparse
import copy
import datetime
import json
import math
import sys
import time
import traceback
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.common.record import Record, device_line, environment
from benchmarks.common.subjects import (BRANCH_VARIANTS, LOCAL_ONLY, MAX_LRS, MODEL_VARIANTS,
                                        NEEDS_CUDA, NUMERICS_VARIANTS, TRAINING_MODE,
                                        backbone_memory_keys, branch_like, build_classifier,
                                        describe_error, free, gemm_shapes, global_branches,
                                        hooked_inputs, logits_fn, median_ms, memories_of,
                                        memory_like, precision, pytorch_path_forced,
                                        relative_error, supported_memory_keys, unsupported)
from convneur_mm.analysis.timing import PeakMemoryGrowth, time_call, time_calls, time_in_turns
from convneur_mm.engine.compile import compile_model, graphs_compiled
from convneur_mm.utils.cli import non_negative_float, positive_int

if TYPE_CHECKING:  # not at run time: the memory imports where it is used
    from convneur_mm.models.layers.memory_ops.kernels.tuned import MeasuredPath

SCHEMA = 'benchmarks.memory/1'
SECTIONS = ('gemm', 'branch', 'model', 'numerics', 'latency', 'compiled', 'profile')
# the profile repeats what the others time, under the profiler: asked for on its own
DEFAULT_SECTIONS = SECTIONS[:-1]
DEFAULT_BUDGET_S = 450.0  # a GPU run's default; a dry run has none unless asked
# what the first item of a kind needs before one has been timed: a compiled
# mode took about 65 s on an H200, and started with less it is killed mid-way
FIRST_ITEM_S = {'compiled_mode': 60.0}

# Tiny sizes for the CPU dry run; the speed table's protocol on the GPU. The dry
# run's 32x32 images give stage 1 64 tokens: chunks of 16 (instead of the
# config's 196) keep its write path, 3 written chunks, in every section.
SIZES = {
    'full': dict(batch=128, image=224, iters=10, warmup=2, rounds=6, latency_iters=50,
                 numerics_batch=8, chunk_size=None),
    'dry': dict(batch=2, image=32, iters=1, warmup=0, rounds=1, latency_iters=1,
                numerics_batch=2, chunk_size=16),
}


class Budget:
    """The run's deadline (``seconds`` from now; None: none); ``why_not(needs)``
    says why an item that needs that long must be skipped, or None where it fits."""

    def __init__(self, seconds: Optional[float]):
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        """Seconds to the deadline (negative past it; inf without one)."""
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.monotonic() - self.start)

    def why_not(self, needs: float) -> Optional[str]:
        left = self.left()
        if left >= needs:
            return None
        return f'skipped: budget ({max(left, 0):.0f} s left, needs about {needs:.0f} s)'


class MemorySuite:
    """What the sections share: the device, sizes, budget, models and log."""

    def __init__(self, record: Record, dry_run: bool = False,
                 batch: Optional[int] = None, budget_s: Optional[float] = None,
                 variants: Optional[Sequence[str]] = None):
        self.record = record
        self.variants = None if variants is None else tuple(variants)
        self.dry = dry_run
        self.device = 'cpu' if self.dry else 'cuda'
        self.cuda = self.device == 'cuda'
        self.sizes = dict(SIZES['dry' if self.dry else 'full'])
        if batch:
            self.sizes['batch'] = batch
        self.budget = Budget(budget_s)
        self.last_s: Dict[str, float] = {}
        self.logs: List[str] = []
        self.memory_keys: Optional[List[str]] = None
        self.result: Dict = dict(schema=SCHEMA, dry_run=self.dry, sizes=self.sizes,
                                 budget_s=budget_s, variants=variants, sections={})

    def wants(self, variant: str) -> bool:
        """Whether this run measures ``variant`` (``--variants``; default all)."""
        return self.variants is None or variant in self.variants

    def why_not(self, kind: str) -> Optional[str]:
        """Why the next item of ``kind`` must be skipped (the last one of that
        kind took longer than the time left), or None."""
        first = 0.0 if self.dry else FIRST_ITEM_S.get(kind, 0.0)
        return self.budget.why_not(self.last_s.get(kind, first))

    def measured(self, kind: str, start: float) -> None:
        """Record the seconds since ``start`` as the cost of an item of ``kind``."""
        self.last_s[kind] = time.monotonic() - start

    def log(self, text: str) -> None:
        self.logs.append(text)
        print(text, file=sys.stderr, flush=True)

    def checkpoint(self, partial: Dict) -> None:
        """Save the running section's results so far: a run killed before the
        section ends keeps them, marked as cut off."""
        self.result['sections'][self.section] = dict(
            partial, status='error: cut off before the section ended (partial results)',
            seconds=time.monotonic() - self.section_start)
        self.write()

    def write(self) -> None:
        """The JSON so far (atomically: a run killed mid-write leaves the last one)."""
        self.result['elapsed_s'] = time.monotonic() - self.budget.start
        self.record.write(self.result)

    def setup(self) -> None:
        """Describe the environment, build M3 and local-only, record the
        branches' inputs."""
        import convneur_mm.models  # noqa: F401 (registers the backbone)
        description = device_line(self.device)  # TF32 off on CUDA
        self.memory_keys = supported_memory_keys()
        self.result['environment'] = environment(self.device, description)
        torch.manual_seed(0)
        self.m3 = build_classifier(self.device, self.sizes['chunk_size'])
        self.local_only = build_classifier(self.device, self.sizes['chunk_size'], LOCAL_ONLY)
        self.m3_branches = global_branches(self.m3)
        if len(self.m3_branches) != 4 or global_branches(self.local_only):
            raise RuntimeError(f'expected M3 with 4 global branches and local-only with none, '
                               f'got {len(self.m3_branches)} and '
                               f'{len(global_branches(self.local_only))}')
        x = torch.randn(self.sizes['batch'], 3, self.sizes['image'], self.sizes['image'],
                        device=self.device)
        self.branch_inputs = hooked_inputs(self.m3, x, self.m3_branches)
        # tokens per image at stage 1, from the memory's own input
        (tokens, ) = hooked_inputs(self.m3, x[:1], [self.m3_branches[0].memory])
        self.stage1_tokens = tokens.shape[1]


# ------------------------------------------------------------- the sections
def graph_latency(forward: Callable[[], torch.Tensor], iters: int, warmup: int,
                  device: str = 'cuda') -> Dict:
    """Batch-1 latency of ``forward`` (no arguments; inference): plain calls,
    and replays of a ``torch.cuda.CUDAGraph`` captured from it, with the
    graph's output against the eager one. Autocast inside ``forward`` must
    run with ``cache_enabled=False``: cached casts would be freed after the
    capture while the graph still reads them."""
    eager = time_calls(forward, iters, device, warmup=warmup)
    want = forward()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture wants
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = forward()
    graph.replay()
    torch.cuda.synchronize()
    replay = time_calls(graph.replay, iters, device, warmup=warmup)
    return dict(status='ok', eager_ms=median_ms(eager), graph_ms=median_ms(replay),
                graph_error_vs_eager=relative_error([got.float()], [want.float()]))


def graph_breaks(backbone: torch.nn.Module, x: torch.Tensor, context: Optional[str],
                 device: str) -> Dict:
    """``torch._dynamo.explain`` of ``backbone`` on ``x`` under the
    ``precision`` context: the number of graph breaks and their first reasons
    (a break costs a graph per block)."""
    try:
        with torch.inference_mode(), precision(context, device):
            explanation = torch._dynamo.explain(backbone)(x)
    except Exception as exc:  # noqa: BLE001
        return dict(status=describe_error(exc))
    finally:
        torch._dynamo.reset()
    return dict(status='ok', count=explanation.graph_break_count,
                reasons=[str(r.reason)[:300] for r in explanation.break_reasons[:3]])


def section_gemm(ctx: MemorySuite) -> Dict:
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


def section_branch(ctx: MemorySuite) -> Dict:
    rows = {}
    inputs = ctx.branch_inputs
    baseline: Optional[List[torch.Tensor]] = None
    if not ctx.wants('float32'):  # every row's reference, computed though not asked for
        with torch.inference_mode():
            baseline = [b(t).float() for b, t in zip(ctx.m3_branches, inputs)]
    for name, (cfg, context, training, cuda_only) in BRANCH_VARIANTS.items():
        if not ctx.wants(name):
            continue
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


def _model_rows(ctx: MemorySuite, models: Dict[str, torch.nn.Module], modes: Sequence[str],
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


def section_model(ctx: MemorySuite) -> Dict:
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


def section_compiled(ctx: MemorySuite) -> Dict:
    backend = 'inductor' if ctx.cuda else 'eager'
    why = ctx.why_not('compiled_mode')
    if why:
        return dict(status=why)
    # bf16 first: the targets are bf16's, and the budget may end before float32.
    # A dry run traces one mode: tracing M3 takes most of its time on a CPU
    modes = ('float32', ) if ctx.dry else ('bf16_autocast', 'float32')
    rows: Dict = {}
    paths: List = []  # the MeasuredPath that 'auto' under torch.compile reads
    # the PyTorch path, whatever 'auto' takes under torch.compile: the reference
    # that the kernels' row and its MeasuredPath are measured against
    reference = copy.deepcopy(ctx.m3)
    _on_pytorch_path(reference)
    for mode in modes:
        # a run compiles for one precision: an empty Dynamo cache and fresh
        # copies per mode, so that one mode's graphs do not use up the other's
        # recompile limit (then the rest runs eager)
        torch._dynamo.reset()
        models = {'M3': copy.deepcopy(reference),
                  'M3 local-only': copy.deepcopy(ctx.local_only)}
        for model in models.values():
            compile_model(model, backend=backend)
        before = graphs_compiled()
        rows.update(_model_rows(ctx, models, (mode, ), compiled=True, checkpoint=lambda part:
                                ctx.checkpoint(dict(backend=backend, modes={**rows, **part}))))
        if rows[mode]['status'] == 'ok':
            rows[mode]['graphs'] = graphs_compiled() - before
        if mode == 'bf16_autocast' and ctx.cuda:
            kernels_row = 'bf16_autocast implementation=triton'
            rows[kernels_row] = _compiled_kernels_rows(
                ctx, backend, models['M3 local-only'], lambda part: ctx.checkpoint(
                    dict(backend=backend, modes={**rows, kernels_row: part})))
            entry = compiled_measured_path(rows, torch.cuda.get_device_capability(ctx.device),
                                           torch.cuda.get_device_name(ctx.device),
                                           ctx.sizes['batch'], memories_of(reference)[0].head_dim)
            if entry is not None:
                paths.append(entry)
                print(f'[memory] MEASURED_PATHS entry: {entry!r},', file=sys.stderr)
        # after the kernels' row, which reuses this mode's compiled local-only
        # network: explaining resets Dynamo, which would compile it again there
        if rows[mode]['status'] == 'ok':
            rows[mode]['graph_breaks'] = graph_breaks(  # of the path the row timed
                reference.backbone, torch.randn(2, 3, ctx.sizes['image'], ctx.sizes['image'],
                                                device=ctx.device),
                'bf16' if mode == 'bf16_autocast' else None, ctx.device)
        del models
        free(ctx.device)
    del reference
    if ctx.dry:
        rows['bf16_autocast'] = dict(status='skipped: dry run (one traced mode checks the path)')
    return dict(backend=backend, mode='default', batch=ctx.sizes['batch'], modes=rows,
                measured_paths=[e._asdict() for e in paths],
                paths=[f'{e!r},' for e in paths],
                note='convneur_mm.engine.compile.compile_model (backbone and head), compiled '
                'anew per mode; first_call_s includes the compilation; graphs: Dynamo graphs '
                'of both models (two each without breaks: backbone and head)')


def _on_pytorch_path(model: torch.nn.Module) -> None:
    """Every memory of ``model`` with ``implementation='torch'``."""
    for memory in memories_of(model):
        memory.implementation = 'torch'


def compiled_measured_path(modes: Dict, capability: Tuple[int, int], card: str,
                           batch: int, head_dim: int) -> Optional['MeasuredPath']:
    """The ``MeasuredPath`` (``compiled=True``) by which 'auto' decides under
    torch.compile: M3 compiled with every kernel in its graph
    (``_compiled_kernels_rows``) against M3 compiled on the PyTorch path, bf16
    inference, as ``section_compiled``'s ``modes`` timed them, for its
    memories' ``head_dim``; None where either row did not end ok."""
    from convneur_mm.models.layers.memory_ops.kernels.tiles import block_width
    from convneur_mm.models.layers.memory_ops.kernels.tuned import MeasuredPath
    torch_row, kernels_row = (modes.get(name, {}) for name in (
        'bf16_autocast', 'bf16_autocast implementation=triton'))
    if torch_row.get('status') != 'ok' or kernels_row.get('status') != 'ok':
        return None
    return MeasuredPath(capability[0] * 10 + capability[1], 'bfloat16', False,
                        round(kernels_row['models']['M3']['ms'], 3),
                        round(torch_row['models']['M3']['ms'], 3),
                        f'an {card}, M3 compiled whole in inference at batch {batch}',
                        every_kernel=True, block_d=block_width(head_dim), compiled=True)


def _compiled_kernels_rows(ctx: MemorySuite, backend: str, local_only: torch.nn.Module,
                           checkpoint: Callable[[Dict], None]) -> Dict:
    """M3 with ``implementation='triton'`` compiled (the kernels as custom operators
    in its graph) against the compiled local-only network already timed: the
    measurement by which ``'auto'`` may take the kernels under torch.compile."""
    forced = pytorch_path_forced()
    if forced is not None:
        return dict(status=f'skipped: {forced}')
    try:
        model = build_classifier(ctx.device, ctx.sizes['chunk_size'],
                                 {'model.backbone.memory_cfg.implementation': 'triton'})
        model.load_state_dict(ctx.m3.state_dict())
        compile_model(model, backend=backend)
        row = _model_rows(ctx, {'M3': model, 'M3 local-only': local_only}, ('bf16_autocast', ),
                          compiled=True, checkpoint=lambda part: checkpoint(
                              part['bf16_autocast']))['bf16_autocast']
    except Exception as exc:  # noqa: BLE001
        row = dict(status=describe_error(exc))
        ctx.log(traceback.format_exc())
    return dict(row, memory_cfg=dict(implementation='triton'),
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


def section_latency(ctx: MemorySuite) -> Dict:
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


def section_numerics(ctx: MemorySuite) -> Dict:
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


def _logits_numerics(ctx: MemorySuite, x: torch.Tensor) -> Dict:
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


def _memory_numerics(ctx: MemorySuite, memory: torch.nn.Module, tokens: torch.Tensor) -> Dict:
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
        for name in filter(ctx.wants, NUMERICS_VARIANTS):
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


def section_profile(ctx: MemorySuite) -> Dict:
    """The kernel profile of each of ``kernels.profile.CASES`` at the run's batch."""
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
        ctx.checkpoint(dict(rows=rows))
    return dict(rows=rows)


SECTION_FNS = dict(gemm=section_gemm, branch=section_branch, model=section_model,
                   numerics=section_numerics, latency=section_latency,
                   compiled=section_compiled, profile=section_profile)


# ---------------------------------------------------------------- the run
def run_sections(ctx: MemorySuite, sections: Sequence[str]) -> None:
    """Each of ``SECTIONS`` asked for, in order, its record saved after it."""
    for name in SECTIONS:
        if name not in sections:
            ctx.result['sections'][name] = dict(status='skipped: not asked for (--sections)')
            continue
        start = ctx.section_start = time.monotonic()
        ctx.section = name
        ctx.checkpoint({})  # a run killed inside the section says so
        print(f'[memory] {name} ({ctx.budget.left():.0f} s left)', file=sys.stderr,
              flush=True)
        try:
            rec = SECTION_FNS[name](ctx)
            rec.setdefault('status', 'ok')
        except Exception as exc:  # noqa: BLE001
            rec = dict(status=describe_error(exc))
            ctx.log(traceback.format_exc())
        rec['seconds'] = time.monotonic() - start
        ctx.result['sections'][name] = rec
        ctx.write()
        free(ctx.device)


def statuses(node, path: str = '') -> List[Tuple[str, str]]:
    """Every (path, status) in the result tree."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get('status'), str):
            found.append((path or '/', node['status']))
        for key, value in node.items():
            found += statuses(value, f'{path}/{key}')
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += statuses(value, f'{path}/{i}')
    return found


def check_schema(result: Dict) -> List[str]:
    """What is wrong with the result's form (empty: nothing)."""
    problems = []
    for key in ('schema', 'dry_run', 'sizes', 'budget_s', 'sections', 'environment',
                'elapsed_s'):
        if key not in result:
            problems.append(f'missing top-level key {key!r}')
    if result.get('schema') != SCHEMA:
        problems.append(f'schema is {result.get("schema")!r}, not {SCHEMA!r}')
    sections = result.get('sections', {})
    for name in SECTIONS:
        if not isinstance(sections.get(name), dict):
            problems.append(f'section {name!r} missing')
        elif not isinstance(sections[name].get('seconds'), (int, float)) and \
                not sections[name].get('status', '').startswith('skipped: not asked'):
            problems.append(f'section {name!r} has no seconds')
    for path, status in statuses(sections):
        if status != 'ok' and not status.startswith(('skipped: ', 'error: ')):
            problems.append(f'{path}: status {status!r} is not ok, skipped: or error:')
    try:
        json.loads(json.dumps(result))
    except (TypeError, ValueError) as exc:
        problems.append(f'not JSON: {exc}')
    return problems


def _get(node, *keys):
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def targets(result: Dict) -> Dict[str, Dict]:
    """The memory's GPU targets, with this run's figures where it measured
    them (bf16 autocast, batch 128, 224², ratios against local-only). 2577
    img/s: M3 under bf16 autocast on an H100 before the tensor-core memory
    (docs/notes/benchmarks.md)."""
    s = result['sections']
    rows = {}

    def put(name, value, target, ok=None):
        rows[name] = dict(value=value, target=target,
                          met=None if value is None or ok is None else bool(ok(value)))

    bf16 = _get(s, 'model', 'modes', 'bf16_autocast')
    f32 = _get(s, 'model', 'modes', 'float32')
    put('four branches ms per batch, bf16 eager inference', _get(bf16, 'branches_ms'), '<= 3',
        lambda v: v <= 3)
    put('four branches ms per training step, bf16 eager',
        _get(s, 'branch', 'rows', TRAINING_MODE, 'ms'), '<= 15', lambda v: v <= 15)
    put('branch overhead over local-only, bf16 eager',
        _get(bf16, 'overhead_over_local'), '<= 0.20', lambda v: v <= 0.20)
    # compiled: the faster of the PyTorch path and the kernels, as a measured 'auto' takes
    compiled = [_get(s, 'compiled', 'modes', mode, 'overhead_over_local') for mode in
                ('bf16_autocast', 'bf16_autocast implementation=triton')]
    compiled = [v for v in compiled if v is not None]
    put('branch overhead over local-only, bf16 compiled', min(compiled) if compiled else None,
        '<= 0.50', lambda v: v <= 0.50)
    put('training step overhead over local-only, bf16 eager',
        _get(s, 'model', 'modes', TRAINING_MODE, 'overhead_over_local'), '<= 0.40',
        lambda v: v <= 0.40)
    put('M3 img/s, bf16 eager', _get(bf16, 'models', 'M3', 'images_per_s'),
        '>= 2 x 2577 (H100, before)', lambda v: v >= 2 * 2577)
    m3_bf16, m3_f32 = _get(bf16, 'models', 'M3', 'ms'), _get(f32, 'models', 'M3', 'ms')
    put('M3 bf16 speed-up over M3 float32',
        m3_f32 / m3_bf16 if m3_bf16 and m3_f32 else None, '>= 1.8', lambda v: v >= 1.8)
    for mode, row in (('bf16', bf16), ('float32', f32)):
        m3p = _get(row, 'models', 'M3', 'peak_growth_mib')
        lop = _get(row, 'models', 'M3 local-only', 'peak_growth_mib')
        put(f'peak inference memory over local-only, {mode}',
            m3p / lop if m3p and lop else None, '<= 1.2', lambda v: v <= 1.2)
    put('batch-1 latency over local-only, CUDA graph, bf16',
        _get(s, 'latency', 'rows', 'ratio bf16_autocast', 'graph'), '<= 1.3',
        lambda v: v <= 1.3)
    put('logits relative error against float32, bf16',
        _get(s, 'numerics', 'logits', 'rows', 'bf16_autocast', 'error_vs_float32'), '<= 0.01',
        lambda v: v <= 0.01)
    put('update-contribution error at max_lr 1e-3, bf16 autocast',
        _get(s, 'numerics', 'memory', 'rows', 'max_lr=0.001', 'bf16_autocast', 'update_error'),
        '<= 0.01', lambda v: v <= 0.01)
    return rows


def print_summary(result: Dict) -> None:
    print('\n[memory] targets (bf16 autocast, batch %d):' % result['sizes']['batch'])
    for name, row in result['targets'].items():
        value = row['value']
        shown = '-' if value is None else f'{value:.4g}'
        met = {True: 'met', False: 'NOT met', None: ''}[row['met']]
        print(f'  {name:58s} {shown:>10s}  target {row["target"]:28s} {met}')
    failed = [(p, st) for p, st in statuses(result['sections']) if st.startswith('error: ')]
    skipped = [(p, st) for p, st in statuses(result['sections']) if st.startswith('skipped: ')]
    print(f'[memory] {len(skipped)} items skipped, {len(failed)} failed')
    for path, status in failed:
        print(f'  FAILED {path}: {status[:300]}')


def run(record: Record, sections: Sequence[str] = DEFAULT_SECTIONS, dry_run: bool = False,
        batch: Optional[int] = None, budget_s: Optional[float] = None,
        argv: Optional[Sequence[str]] = None,
        variants: Optional[Sequence[str]] = None) -> Tuple[int, Dict]:
    """Run the asked ``sections``; print the targets and what failed.

    Args:
        record: the run's JSON, rewritten after every section.
        sections: which of ``SECTIONS`` to run (the rest are recorded as not asked for).
        dry_run: tiny sizes on the CPU (else CUDA, which must be there).
        batch: the throughput batch instead of the default (128; dry run 2).
        budget_s: seconds the whole run may take (None: ``DEFAULT_BUDGET_S``
            on a GPU, no limit in a dry run).
        argv: the command line, recorded in the JSON.
        variants: the memory variants (``subjects.BRANCH_VARIANTS``) the
            branch and numerics sections measure (None: all).

    Returns:
        The exit status (0: no item failed and the JSON has its schema; 1
        otherwise) and the result.
    """
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f'unknown sections {unknown}; known: {SECTIONS}')
    if budget_s is None and not dry_run:
        budget_s = DEFAULT_BUDGET_S
    ctx = MemorySuite(record, dry_run, batch, budget_s, variants)
    ctx.result['started'] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    ctx.result['argv'] = list(argv or [])
    try:
        ctx.setup()
    except Exception as exc:  # noqa: BLE001 (recorded; nothing else can run)
        ctx.log(traceback.format_exc())
        ctx.result['setup'] = describe_error(exc)
        ctx.result.setdefault('environment', {})
        for name in SECTIONS:
            ctx.result['sections'][name] = dict(status='skipped: set-up failed', seconds=0.0)
        ctx.write()
        print(f'[memory] set-up failed: {exc}', file=sys.stderr)
        return 1, ctx.result
    ctx.result['setup'] = 'ok'
    ctx.write()
    run_sections(ctx, sections)
    ctx.result['targets'] = targets(ctx.result)
    problems = check_schema(ctx.result)
    ctx.result['schema_problems'] = problems
    ctx.write()
    print_summary(ctx.result)
    failed = [st for _, st in statuses(ctx.result['sections']) if st.startswith('error: ')]
    for problem in problems:
        print(f'[memory] schema: {problem}', file=sys.stderr)
    return (1 if failed or problems else 0), ctx.result


# ----------------------------------------------------------------- the case
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``memory`` case's options."""
    parser.add_argument('--sections', nargs='+', choices=SECTIONS,
                        default=list(DEFAULT_SECTIONS), help='default: all but profile')
    parser.add_argument('--batch', type=positive_int,
                        help='throughput batch (default 128; dry run 2)')
    parser.add_argument('--budget-s', type=non_negative_float,
                        help=f'seconds the whole run may take (default {DEFAULT_BUDGET_S:.0f}; '
                        'a dry run: none)')
    parser.add_argument('--variants', nargs='+', choices=list(BRANCH_VARIANTS), metavar='NAME',
                        help='only these memory variants in the branch and numerics sections '
                        '(default all): the GPU run gives each that launches kernels a process')
    parser.add_argument('--tuned', nargs='+', default=[], metavar='JSON',
                        help='tune records whose entries apply (kernels.tune.apply_tuned)')


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """``run`` with the parsed options, its JSON rewritten after every
    section; exit code 2 without CUDA outside a dry run."""
    if not args.dry_run and not torch.cuda.is_available():
        print('memory: no CUDA device; on a CPU run it with --dry-run', file=sys.stderr)
        return dict(exit_code=2)
    if args.tuned:
        from benchmarks.kernels.tune import apply_tuned
        print(f'[memory] tuned entries applied: {apply_tuned(args.tuned)}')
    code, result = run(record, args.sections, args.dry_run, args.batch, args.budget_s,
                       record.argv, args.variants)
    if record.path:
        print(f'[memory] wrote {record.path} in {result["elapsed_s"]:.0f} s')
    return dict(result, exit_code=code)
