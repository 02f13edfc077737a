"""The neural memory's GPU figures in one call: every variant, one JSON file.

    python3 .dev_scripts/gpu_memory_bench.py [--out FILE] [--budget-s 450]
        [--sections gemm branch model numerics latency compiled] [--dry-run]

Run with the project's stack importable: here with .venv's python, on a
lent GPU machine after ``source .dev_scripts/device_env.sh``
(.dev_scripts/README.md). The JSON goes to ``--out``, else to
``$OUT/gpu_memory_bench.json``; it is rewritten after every section, so a
run cut short keeps what it measured. A short table of the targets is
printed last.

Sections, in the order they run (cheap and decisive first):

* ``gemm``: the memory's own matrix products at their real shapes (stage 1 of
  ConvNeur-M3, ``--batch`` images): float32, TF32, bf16 (bf16 output) and
  bf16 operands with a float32 output; TFLOP/s of the median call.
* ``branch``: the four global branches of M3 alone, on the inputs they get at
  ``--batch``: each memory variant's time, peak memory growth and error
  against float32. Variants are ``memory_cfg`` keys (``matmul_dtype``,
  ``kernels``, ``working_set_mib``, ``recompute`` for training) plus TF32 and
  bf16 autocast; a key the installed ``NeuralMemory`` does not take is
  recorded as skipped, so the script runs at any commit.
* ``model``: M3 against M3 local-only (``memory_placement='none'``), called in
  turns, float32 and bf16 autocast, eager: throughput, the branches' time per
  batch, peak memory growth.
* ``numerics``: logits against float32 and float64; the memory of stage 1
  against float64 per variant, with the update-contribution error (output
  minus the W_0-only output) at ``max_lr`` 1, 0.2 and 1e-3.
* ``latency``: batch 1, eager and replayed from a captured CUDA graph.
* ``compiled``: ``model`` again with backbone and head through
  ``torch.compile`` (Inductor; compiling is the costliest part, so it runs
  last and the budget may skip it).

Every section, and every item in it, checks the time left (``--budget-s``)
first and records ``skipped: <reason>`` where it would not fit; an item that
fails records ``error: <reason>`` and the run goes on. The exit status is
non-zero if anything failed.

``--dry-run`` runs every section that a CPU can run at tiny sizes (batch 2,
32x32 images, chunks of 16 tokens so that stage 1 still writes, one timed
call; ``torch.compile`` with the ``eager`` backend, tracing only), checks
its own set-up (imports, the output writable, the JSON's schema) and exits
non-zero on any failure; the CUDA-only items (TF32, Triton kernels, CUDA
graphs) record ``skipped: needs CUDA``.
"""
import argparse
import contextlib
import copy
import datetime
import importlib.util
import inspect
import json
import math
import os
import os.path as osp
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# the package comes from the environment (.venv's editable install here;
# device_env.sh's PYTHONPATH on a lent GPU machine), as for the tools
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

SCHEMA = 'convneur_mm.gpu_memory_bench/1'
SECTIONS = ('gemm', 'branch', 'model', 'numerics', 'latency', 'compiled')
M3_CONFIG = 'cls_convneur_m3_300e_in1k.py'
LOCAL_ONLY = {'model.backbone.memory_placement': 'none'}
MAX_LRS = (1.0, 0.2, 1e-3)
NEEDS_CUDA = 'skipped: needs CUDA'

# Tiny sizes for the CPU dry run; the speed table's protocol on the GPU. The dry
# run's 32x32 images give stage 1 64 tokens: chunks of 16 (instead of the
# config's 196) keep its write path, 3 written chunks, in every section.
SIZES = {
    'full': dict(batch=128, image=224, iters=10, warmup=2, rounds=6, latency_iters=50,
                 numerics_batch=8, chunk_size=None),
    'dry': dict(batch=2, image=32, iters=1, warmup=0, rounds=1, latency_iters=1,
                numerics_batch=2, chunk_size=16),
}
# Rough seconds each item needs on an H100, for the budget guard (a dry run
# on a CPU is given no budget limit unless one is asked for).
NEEDS_S = dict(gemm=30, branch_variant=12, model=40, numerics=40, latency=40,
               compiled_mode=150)

# name -> (memory_cfg keys, context, training, needs CUDA). Contexts: 'tf32'
# (TF32 products and convolutions), 'bf16' (CUDA/CPU bf16 autocast), None.
# 'float32' is the defaults ('auto': Triton kernels where they apply on
# CUDA), the reference of every row's error; 'torch_float32' the PyTorch path.
BRANCH_VARIANTS = {
    'float32': ({}, None, False, False),
    'torch_float32': ({'kernels': 'torch', 'matmul_dtype': 'float32'}, None, False, False),
    'tf32': ({}, 'tf32', False, True),
    'bf16_autocast': ({}, 'bf16', False, False),
    'matmul_float32': ({'matmul_dtype': 'float32'}, None, False, False),
    'matmul_bfloat16': ({'matmul_dtype': 'bfloat16'}, None, False, False),
    'matmul_bfloat16_torch': ({'matmul_dtype': 'bfloat16', 'kernels': 'torch'}, None, False,
                              False),
    'triton_float32': ({'matmul_dtype': 'float32', 'kernels': 'triton'}, None, False, True),
    'triton_bfloat16': ({'matmul_dtype': 'bfloat16', 'kernels': 'triton'}, None, False, True),
    'bf16_autocast_triton': ({'kernels': 'triton'}, 'bf16', False, True),
    'working_set_1024': ({'working_set_mib': 1024}, None, False, False),
    'working_set_256': ({'working_set_mib': 256}, None, False, False),
    'working_set_256_bf16_autocast': ({'working_set_mib': 256}, 'bf16', False, False),
    'train_float32': ({}, None, True, False),
    'train_recompute': ({'recompute': True}, None, True, False),
    'train_bf16_autocast': ({}, 'bf16', True, False),
    'train_recompute_bf16_autocast': ({'recompute': True}, 'bf16', True, False),
}
# the memory variants whose numerics are measured against float64
NUMERICS_VARIANTS = ('float32', 'torch_float32', 'tf32', 'bf16_autocast', 'matmul_bfloat16',
                     'triton_float32', 'triton_bfloat16', 'bf16_autocast_triton')
# whole-model rows besides M3 and local-only: the PyTorch path, the bounded
# working set
MODEL_VARIANTS = {'M3 kernels=torch': {'kernels': 'torch'},
                  'M3 working_set_256': {'working_set_mib': 256}}


# --------------------------------------------------------------------- set-up

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from convneur_mm.utils.cli import positive_int
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', help='the JSON file (default: $OUT/gpu_memory_bench.json)')
    parser.add_argument('--budget-s', type=float, default=None,
                        help='seconds the whole run may take (default 450; a dry run: none)')
    parser.add_argument('--sections', nargs='+', choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument('--dry-run', action='store_true',
                        help='tiny sizes on the CPU; checks the set-up and the JSON schema')
    parser.add_argument('--batch', type=positive_int,
                        help='throughput batch (default 128; dry run 2)')
    return parser.parse_args(argv)


def output_path(args: argparse.Namespace) -> str:
    """``--out``, else ``$OUT/gpu_memory_bench.json``; a clear error without either."""
    if args.out:
        return args.out
    if os.environ.get('OUT'):
        return osp.join(os.environ['OUT'], 'gpu_memory_bench.json')
    raise SystemExit('gpu_memory_bench: give --out FILE or set OUT to a folder')


def check_writable(path: str) -> None:
    """Fail at start, not after minutes of measuring, if ``path`` cannot be written."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    probe = path + '.probe'
    with open(probe, 'w') as f:
        f.write('{}')
    os.remove(probe)


class Budget:
    """The run's deadline; ``why_not(seconds)`` says why an item that needs
    that long must be skipped, or None where it fits."""

    def __init__(self, seconds: Optional[float]):
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.monotonic() - self.start)

    def why_not(self, needs: float) -> Optional[str]:
        left = self.left()
        if left >= needs:
            return None
        return f'skipped: budget ({max(left, 0):.0f} s left, needs about {needs:.0f} s)'


def describe_error(exc: BaseException) -> str:
    text = f'{type(exc).__name__}: {exc}'.strip()
    return 'error: ' + ' '.join(text.split())[:500]


def supported_memory_keys() -> Optional[List[str]]:
    """The keyword arguments the installed ``NeuralMemory`` takes (None: any,
    it takes ``**kwargs``)."""
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    params = inspect.signature(NeuralMemory.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name in params if name != 'self']


def backbone_memory_keys() -> Optional[List[str]]:
    """The ``memory_cfg`` keys the backbone passes on (None: it names none)."""
    from convneur_mm.models.backbones import convneur
    keys = getattr(convneur, 'MEMORY_KEYS', None)
    return list(keys) if keys is not None else None


def unsupported(cfg: Dict, keys: Optional[List[str]], who: str = 'NeuralMemory') -> Optional[str]:
    """Why a variant cannot run at this commit, or None."""
    missing = [k for k in cfg if keys is not None and k not in keys]
    if missing:
        return (f'skipped: {who} here takes no {", ".join(map(repr, missing))} '
                f'(it takes {", ".join(keys)})')
    return None


def environment(device: str, description: str) -> Dict:
    """Versions, the device and its state, the commit: what the figures need beside them."""
    info = dict(description=description, python=platform.python_version(),
                torch=torch.__version__, cuda=torch.version.cuda, host=platform.node(),
                cpu_count=os.cpu_count(), memory_keys=supported_memory_keys(),
                backbone_memory_keys=backbone_memory_keys())
    for name in ('triton', 'mmcv', 'mmengine', 'mmpretrain'):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 (recorded, not needed)
            info[name] = describe_error(exc)
    try:
        info['mmcv_ops'] = importlib.util.find_spec('mmcv._ext') is not None
    except (ImportError, ValueError):
        info['mmcv_ops'] = False
    try:
        info['commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, text=True,
                                        capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info['commit'] = None
    if device.startswith('cuda'):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, capability='%d.%d' % (props.major, props.minor),
                    multiprocessors=props.multi_processor_count,
                    gpu_memory_gib=props.total_memory / 2**30)
        try:
            info['nvidia_smi'] = subprocess.run(
                ['nvidia-smi', '--query-gpu=name,driver_version,clocks.sm,clocks.mem,'
                 'clocks.max.sm,power.limit,temperature.gpu', '--format=csv,noheader'],
                text=True, capture_output=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info['nvidia_smi'] = describe_error(exc)
    try:
        from convneur_mm.models.layers import memory_kernels
        info['memory_kernels'] = {
            str(dtype).replace('torch.', ''): memory_kernels.unavailable_reason(
                torch.device(device), 128, dtype) or 'available'
            for dtype in (torch.float32, torch.bfloat16)}
    except Exception as exc:  # noqa: BLE001 (an older commit has no kernels)
        info['memory_kernels'] = describe_error(exc)
    return info


# ------------------------------------------------------------------- helpers

@contextlib.contextmanager
def precision(context: Optional[str], device: str):
    """The variant's context: TF32 products, bf16 autocast, or nothing."""
    if context == 'tf32':
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    elif context == 'bf16':
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            yield
    else:
        yield


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over all tensors together, in float64."""
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.double().pow(2).sum()) for w in want)
    return math.sqrt(num / den) if den > 0 else math.nan


def median_ms(seconds: List[float]) -> float:
    from convneur_mm.analysis.bench_env import median
    return median(seconds) * 1e3


def free(device: str) -> None:
    import gc
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()


def build_classifier(ctx: 'Run', options: Optional[Dict] = None) -> torch.nn.Module:
    """ConvNeur-M3's ImageNet classifier from its config, with overrides,
    on the run's device in eval mode."""
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    cfg = load_config(M3_CONFIG)
    if ctx.sizes['chunk_size']:
        cfg.merge_from_dict({'model.backbone.memory_cfg.chunk_size': ctx.sizes['chunk_size']})
    if options:
        cfg.merge_from_dict(options)
    return build_model(cfg, init=True).to(ctx.device).eval()


def logits_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: model(x, mode='tensor')


def global_branches(model: torch.nn.Module) -> List[torch.nn.Module]:
    from convneur_mm.models.layers.global_branch import GlobalBranch
    return [m for m in model.modules() if isinstance(m, GlobalBranch)]


def hooked_inputs(model: torch.nn.Module, x: torch.Tensor,
                  modules: List[torch.nn.Module]) -> List[torch.Tensor]:
    """The input each of ``modules`` gets in one forward of ``model`` on ``x``."""
    got: Dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: got.setdefault(id(mod), args[0]))
             for m in modules]
    try:
        with torch.no_grad():
            logits_fn(model)(x)
    finally:
        for h in hooks:
            h.remove()
    return [got[id(m)] for m in modules]


def memory_settings(memory: torch.nn.Module) -> Dict:
    """The settings a ``NeuralMemory`` was built with, as ``memory_cfg`` keys."""
    return dict(chunk_size=memory.chunk_size, max_lr=memory.max_lr, update=memory.update,
                heads=memory.heads, scan_block=memory.scan_block)


def memory_like(memory: torch.nn.Module, **cfg) -> torch.nn.Module:
    """A ``NeuralMemory`` with ``memory``'s weights and settings, ``cfg`` overriding."""
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    twin = NeuralMemory(memory.dim, **{**memory_settings(memory), **cfg})
    twin.load_state_dict(memory.state_dict())
    return twin.to(next(memory.parameters()).device)


def branch_like(branch: torch.nn.Module, cfg: Dict) -> torch.nn.Module:
    """A copy of a global branch whose memory takes ``cfg`` on top of its settings."""
    twin = copy.deepcopy(branch)
    twin.memory = memory_like(branch.memory, **cfg)
    return twin


# ------------------------------------------------------------------ sections

def gemm_shapes(memory: torch.nn.Module, batch: int, tokens: int) -> Dict[str, Tuple]:
    """name -> (groups, m, k, n) of the memory's batched products for
    ``batch`` images of ``tokens`` tokens each (stage 1). Products with the
    shared W_0 run as one GEMM over all rows (groups = 1), as in the memory."""
    d, L = memory.head_dim, memory.chunk_size
    hidden = 4 * d
    updates = memory.num_updates(tokens)
    chunks = updates + 1
    shapes = {'projection x.W (B*N, d, d)': (1, batch * tokens, d, d),
              'read q.W1_t per chunk': (batch * chunks, L, d, hidden),
              'read h.W2_t per chunk': (batch * chunks, L, hidden, d)}
    if updates:
        rows = batch * updates * L
        shapes.update({
            'write K.W1_0 (B*U*L rows)': (1, rows, d, hidden),
            'write act.W2_0 (B*U*L rows)': (1, rows, hidden, d),
            'write per-chunk K^T.d_pre': (batch * updates, d, L, hidden),
            'write per-chunk act^T.d_hidden': (batch * updates, hidden, L, d),
            'scan coef.G (w1)': (batch, chunks, updates, d * hidden),
        })
    return shapes


def section_gemm(ctx: 'Run') -> Dict:
    from convneur_mm.analysis.bench_env import time_calls
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


def section_branch(ctx: 'Run') -> Dict:
    from convneur_mm.analysis.bench_env import PeakMemoryGrowth, time_calls
    rows = {}
    inputs = ctx.branch_inputs
    baseline: Optional[List[torch.Tensor]] = None
    for name, (cfg, context, training, cuda_only) in BRANCH_VARIANTS.items():
        row = dict(memory_cfg=cfg, context=context, training=training)
        rows[name] = row
        why = (NEEDS_CUDA if cuda_only and not ctx.cuda else
               unsupported(cfg, ctx.memory_keys) or
               ctx.budget.why_not(ctx.needs('branch_variant')))
        if why:
            row['status'] = why
            continue
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
        except Exception as exc:  # noqa: BLE001
            row['status'] = describe_error(exc)
            ctx.log(traceback.format_exc())
        free(ctx.device)
        ctx.checkpoint(dict(rows=rows))
    return dict(rows=rows, batch=ctx.sizes['batch'],
                note='the four global branches of M3 on the inputs they get in one forward; '
                'ms per call of all four; training rows are forward + backward')


def _model_rows(ctx: 'Run', models: Dict[str, torch.nn.Module], modes: Sequence[str],
                compiled: bool, checkpoint: Callable[[Dict], None]) -> Dict:
    """Each mode's figures of ``models`` (M3 and local-only, called in turns);
    ``checkpoint(rows)`` after each mode saves what is done so far."""
    from convneur_mm.analysis.bench_env import PeakMemoryGrowth, time_call, time_in_turns
    batch = ctx.sizes['batch']
    x = torch.randn(batch, 3, ctx.sizes['image'], ctx.sizes['image'], device=ctx.device)
    out: Dict = {}
    spent = 0.0  # the last mode's seconds: the next one's estimate, where larger
    for mode in modes:
        context = 'bf16' if mode == 'bf16_autocast' else None
        why = ctx.budget.why_not(max(ctx.needs('compiled_mode' if compiled else 'model'), spent))
        if why:
            out[mode] = dict(status=why)
            continue
        start = time.monotonic()
        try:
            fns = {}
            for name, model in models.items():
                def fn(model=model):
                    with torch.inference_mode(), precision(context, ctx.device):
                        return logits_fn(model)(x)
                fns[name] = fn
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
        spent = time.monotonic() - start
        free(ctx.device)
        checkpoint(out)
    return out


def section_model(ctx: 'Run') -> Dict:
    models = {'M3': ctx.m3, 'M3 local-only': ctx.local_only}
    rows = _model_rows(ctx, models, ('float32', 'bf16_autocast'), compiled=False,
                       checkpoint=lambda rows: ctx.checkpoint(dict(modes=rows)))
    variants: Dict = {}
    for name, cfg in MODEL_VARIANTS.items():
        why = (unsupported(cfg, ctx.memory_keys) or
               unsupported(cfg, backbone_memory_keys(), "the backbone's memory_cfg") or
               ctx.budget.why_not(ctx.needs('model')))
        if why:
            variants[name] = dict(status=why)
            continue
        try:
            model = build_classifier(ctx, {f'model.backbone.memory_cfg.{k}': v
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
                'batch; peak growth over weights and input')


def section_compiled(ctx: 'Run') -> Dict:
    from convneur_mm.engine.compile import compile_model, graphs_compiled
    backend = 'inductor' if ctx.cuda else 'eager'
    why = ctx.budget.why_not(ctx.needs('compiled_mode'))
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
            rows[mode]['graph_breaks'] = _graph_breaks(ctx, mode)
        del models
        free(ctx.device)
    if ctx.dry:
        rows['bf16_autocast'] = dict(status='skipped: dry run (one traced mode checks the path)')
    return dict(backend=backend, mode='default', batch=ctx.sizes['batch'], modes=rows,
                note='convneur_mm.engine.compile.compile_model (backbone and head), compiled '
                'anew per mode; first_call_s includes the compilation; graphs: Dynamo graphs '
                'of both models (two each without breaks: backbone and head)')


def _graph_breaks(ctx: 'Run', mode: str) -> Dict:
    """M3's backbone under ``torch._dynamo.explain`` at batch 2: the number of
    graph breaks and their first reasons (a break costs a graph per block)."""
    context = 'bf16' if mode == 'bf16_autocast' else None
    x = torch.randn(2, 3, ctx.sizes['image'], ctx.sizes['image'], device=ctx.device)
    try:
        with torch.inference_mode(), precision(context, ctx.device):
            explanation = torch._dynamo.explain(ctx.m3.backbone)(x)
    except Exception as exc:  # noqa: BLE001
        return dict(status=describe_error(exc))
    finally:
        torch._dynamo.reset()
    return dict(status='ok', count=explanation.graph_break_count,
                reasons=[str(r.reason)[:300] for r in explanation.break_reasons[:3]])


def section_latency(ctx: 'Run') -> Dict:
    from convneur_mm.analysis.bench_env import time_calls
    if not ctx.cuda:
        return dict(status=NEEDS_CUDA)
    rows = {}
    x = torch.randn(1, 3, ctx.sizes['image'], ctx.sizes['image'], device=ctx.device)
    for mode in ('float32', 'bf16_autocast'):
        for name, model in (('M3', ctx.m3), ('M3 local-only', ctx.local_only)):
            key = f'{name} {mode}'
            why = ctx.budget.why_not(ctx.needs('latency') / 4)
            if why:
                rows[key] = dict(status=why)
                continue
            try:
                rows[key] = _latency(ctx, model, x, mode == 'bf16_autocast', time_calls)
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


def _latency(ctx: 'Run', model: torch.nn.Module, x: torch.Tensor, bf16: bool,
             time_calls: Callable) -> Dict:
    # autocast's weight cache must be off while capturing: cached casts
    # would be freed after the capture while the graph still reads them
    def forward():
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16,
                                                    enabled=bf16, cache_enabled=False):
            return logits_fn(model)(x)

    iters, warmup = ctx.sizes['latency_iters'], ctx.sizes['warmup']
    eager = time_calls(forward, iters, ctx.device, warmup=warmup)
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
    replay = time_calls(graph.replay, iters, ctx.device, warmup=warmup)
    return dict(status='ok', eager_ms=median_ms(eager), graph_ms=median_ms(replay),
                graph_error_vs_eager=relative_error([got.float()], [want.float()]))


def section_numerics(ctx: 'Run') -> Dict:
    """Logits against float32 and float64; the stage-1 memory per variant
    against float64 at several ``max_lr``, with the update's contribution."""
    out: Dict = {}
    batch, image = ctx.sizes['numerics_batch'], ctx.sizes['image']
    gen = torch.Generator(device='cpu').manual_seed(0)
    x = torch.randn(batch, 3, image, image, generator=gen).to(ctx.device)
    why = ctx.budget.why_not(ctx.needs('numerics') / 2)
    if why:
        out['logits'] = dict(status=why)
    else:
        try:
            out['logits'] = _logits_numerics(ctx, x)
        except Exception as exc:  # noqa: BLE001
            out['logits'] = dict(status=describe_error(exc))
            ctx.log(traceback.format_exc())
    free(ctx.device)
    why = ctx.budget.why_not(ctx.needs('numerics') / 2)
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


def _logits_numerics(ctx: 'Run', x: torch.Tensor) -> Dict:
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


def _memory_numerics(ctx: 'Run', memory: torch.nn.Module, tokens: torch.Tensor) -> Dict:
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


SECTION_FNS = dict(gemm=section_gemm, branch=section_branch, model=section_model,
                   numerics=section_numerics, latency=section_latency,
                   compiled=section_compiled)


# ----------------------------------------------------------------- the run

class Run:
    """What the sections share: the device, sizes, budget, models and log."""

    def __init__(self, args: argparse.Namespace, out_path: str):
        self.args, self.out_path = args, out_path
        self.dry = args.dry_run
        self.device = 'cpu' if self.dry else 'cuda'
        self.cuda = self.device == 'cuda'
        self.sizes = dict(SIZES['dry' if self.dry else 'full'])
        if args.batch:
            self.sizes['batch'] = args.batch
        budget = args.budget_s if args.budget_s is not None else (None if self.dry else 450.0)
        self.budget = Budget(budget)
        self.logs: List[str] = []
        self.memory_keys: Optional[List[str]] = None
        self.result: Dict = dict(schema=SCHEMA, dry_run=self.dry, sizes=self.sizes,
                                 budget_s=budget, sections={})

    def needs(self, item: str) -> float:
        return 0.0 if self.dry and self.args.budget_s is None else NEEDS_S[item]

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
        tmp = self.out_path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.result, f, indent=1, allow_nan=True)
        os.replace(tmp, self.out_path)

    def setup(self) -> None:
        from convneur_mm.analysis.bench_env import setup_benchmark_device
        import convneur_mm.models  # noqa: F401 (registers the backbone)
        description = setup_benchmark_device(self.device)  # TF32 off on CUDA
        self.memory_keys = supported_memory_keys()
        self.result['environment'] = environment(self.device, description)
        torch.manual_seed(0)
        self.m3 = build_classifier(self)
        self.local_only = build_classifier(self, LOCAL_ONLY)
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


def run_sections(ctx: Run, sections: Sequence[str]) -> None:
    for name in SECTIONS:
        if name not in sections:
            ctx.result['sections'][name] = dict(status='skipped: not asked for (--sections)')
            continue
        start = ctx.section_start = time.monotonic()
        ctx.section = name
        ctx.checkpoint({})  # a run killed inside the section says so
        print(f'[gpu_memory_bench] {name} ({ctx.budget.left():.0f} s left)', file=sys.stderr,
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


# ------------------------------------------------------------ schema, summary

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
    them. 2577 img/s: M3 under bf16 autocast on an H100 before the
    tensor-core memory (docs/notes/benchmarks.md)."""
    s = result['sections']
    rows = {}

    def put(name, value, target, ok=None):
        rows[name] = dict(value=value, target=target,
                          met=None if value is None or ok is None else bool(ok(value)))

    bf16 = _get(s, 'model', 'modes', 'bf16_autocast')
    f32 = _get(s, 'model', 'modes', 'float32')
    put('branch overhead over local-only, bf16 eager',
        _get(bf16, 'overhead_over_local'), '<= 0.15', lambda v: v <= 0.15)
    put('branch overhead over local-only, bf16 compiled',
        _get(s, 'compiled', 'modes', 'bf16_autocast', 'overhead_over_local'), '<= 0.15',
        lambda v: v <= 0.15)
    put('branches ms per batch, bf16 eager', _get(bf16, 'branches_ms'), 'report', None)
    put('M3 img/s, bf16 eager', _get(bf16, 'models', 'M3', 'images_per_s'),
        '>= 2 x 2577 (H100, before)', lambda v: v >= 2 * 2577)
    m3_bf16, m3_f32 = _get(bf16, 'models', 'M3', 'ms'), _get(f32, 'models', 'M3', 'ms')
    put('M3 bf16 speed-up over M3 float32',
        m3_f32 / m3_bf16 if m3_bf16 and m3_f32 else None, '>= 1.8', lambda v: v >= 1.8)
    for mode, row in (('bf16', bf16), ('float32', f32)):
        m3p = _get(row, 'models', 'M3', 'peak_growth_mib')
        lop = _get(row, 'models', 'M3 local-only', 'peak_growth_mib')
        put(f'peak inference memory over local-only, {mode}',
            m3p / lop if m3p and lop else None, '<= 1.1', lambda v: v <= 1.1)
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
    print('\n[gpu_memory_bench] targets (bf16 autocast, batch %d):' % result['sizes']['batch'])
    for name, row in result['targets'].items():
        value = row['value']
        shown = '-' if value is None else f'{value:.4g}'
        met = {True: 'met', False: 'NOT met', None: ''}[row['met']]
        print(f'  {name:58s} {shown:>10s}  target {row["target"]:28s} {met}')
    failed = [(p, st) for p, st in statuses(result['sections']) if st.startswith('error: ')]
    skipped = [(p, st) for p, st in statuses(result['sections']) if st.startswith('skipped: ')]
    print(f'[gpu_memory_bench] {len(skipped)} items skipped, {len(failed)} failed')
    for path, status in failed:
        print(f'  FAILED {path}: {status[:300]}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_path = output_path(args)
    try:
        check_writable(out_path)
    except OSError as exc:
        print(f'gpu_memory_bench: cannot write {out_path}: {exc}', file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print('gpu_memory_bench: no CUDA device; on a CPU run it with --dry-run',
              file=sys.stderr)
        return 2
    ctx = Run(args, out_path)
    ctx.result['started'] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    ctx.result['argv'] = list(argv if argv is not None else sys.argv[1:])
    try:
        ctx.setup()
    except Exception as exc:  # noqa: BLE001 (recorded; nothing else can run)
        ctx.log(traceback.format_exc())
        ctx.result['setup'] = describe_error(exc)
        ctx.result.setdefault('environment', {})
        for name in SECTIONS:
            ctx.result['sections'][name] = dict(status='skipped: set-up failed', seconds=0.0)
        ctx.write()
        print(f'[gpu_memory_bench] set-up failed: {exc}', file=sys.stderr)
        return 1
    ctx.result['setup'] = 'ok'
    ctx.write()
    run_sections(ctx, args.sections)
    ctx.result['targets'] = targets(ctx.result)
    ctx.write()
    problems = check_schema(ctx.result)
    ctx.result['schema_problems'] = problems
    ctx.write()
    print_summary(ctx.result)
    print(f'[gpu_memory_bench] wrote {out_path} in {ctx.result["elapsed_s"]:.0f} s')
    failed = [st for _, st in statuses(ctx.result['sections']) if st.startswith('error: ')]
    for problem in problems:
        print(f'[gpu_memory_bench] schema: {problem}', file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == '__main__':
    sys.exit(main())
