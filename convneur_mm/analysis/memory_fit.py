"""Training memory of the ConvNeur backbone: what checkpointing saves, and the
per-GPU ImageNet batch that fits a card; and the meter of activation memory
they are measured with.

``checkpointing_rows``: memory and time of a training step without
checkpointing, with ``with_cp=True`` (each block's activations recomputed in
the backward pass) and with the memory's own recomputation
(``memory_cfg.recompute=True``: each neural memory saves only its input).
Activation memory is what autograd saves for the backward pass
(``measure_memory``, on any device); with checkpointing the backward
also holds one recomputed block at a time, so the "peak estimate" adds the
largest block's activations (measured without checkpointing). On CUDA also the
allocator's peak over the step.

``imagenet_estimate`` / ``imagenet_batches``: per-GPU memory of ImageNet
training (ConvNeur-M1..M4 at 224x224, ``--amp``) measured with the backbone of
each config under a CPU stand-in for CUDA's fp16 autocast
(``fp16_headroom.cuda_fp16_stand_in``: float16 with LayerNorm in float32, as
CUDA's autocast runs it; CPU bf16 autocast runs LayerNorm in bfloat16 and
would save less: docs/notes/investigations.md#smaller-decisions-in-the-tools). Per GPU: the activations per image plus the
largest block's (held a second time while its backward runs), 16 bytes per
parameter (float32 weights, gradients and AdamW's two moments), and a reserve
for the CUDA context, workspaces and fragmentation (an assumption, not
measured). The per-GPU batch is the largest power of two that fits, and
``accumulative_counts = 4096 / (GPUs x batch)`` keeps the paper's batch.

**Activation memory.** CUDA has ``torch.cuda.max_memory_allocated``; the CPU has no allocator
statistics, and process-level figures (RSS) mix in the allocator's caching
and everything else the process holds. What gradient checkpointing changes is
the memory autograd keeps between forward and backward: the tensors saved for
the backward pass. ``SavedTensorMeter`` counts them through
``torch.autograd.graph.saved_tensors_hooks``: the bytes of the unique storages
saved while it is active (parameters excluded: they are held anyway), in total
and per named scope (e.g. per block), which is the activation memory at the
end of the forward pass, the peak of a training step but for the transient
buffers of single operations. With non-reentrant checkpointing
(``torch.utils.checkpoint(use_reentrant=False)``) a checkpointed block's inputs
are saved through the hooks and counted, its inner activations are not (they
are recomputed in the backward pass).
"""
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from convneur_mm.analysis.timing import PeakMemoryGrowth, is_cuda, median, time_calls

GIB, MIB = 2**30, 2**20
PAPER_BATCH = 4096
# plain, block checkpointing, the memory's own recomputation
VARIANTS = {'False': dict(with_cp=False), 'True': dict(with_cp=True),
            'False + memory recompute': dict(with_cp=False, recompute=True)}


# ---------------------------------------------------- activation memory
class SavedTensorMeter:
    """Context manager: bytes of the storages autograd saves inside it.

    Args:
        exclude: tensors whose storages are not counted (e.g. parameters).
        scopes: name -> module; a storage first saved while a module runs is
            also counted in ``by_scope[name]``.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (),
                 scopes: Optional[Dict[str, nn.Module]] = None):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._scopes = scopes or {}
        self._seen: Dict[int, int] = {}
        self._scope_stack = []
        self.by_scope: Dict[str, int] = defaultdict(int)
        self._handles = []
        self._hooks = None

    @property
    def total_bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self._exclude and key not in self._seen:
            self._seen[key] = storage.nbytes()
            if self._scope_stack:
                self.by_scope[self._scope_stack[-1]] += storage.nbytes()
        return tensor

    def __enter__(self) -> 'SavedTensorMeter':
        def enter(name):
            self._scope_stack.append(name)

        def leave():
            self._scope_stack.pop()

        for name, module in self._scopes.items():
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: enter(name)))
            self._handles.append(module.register_forward_hook(lambda m, args, out: leave()))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def outputs_loss(outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A loss on every output of a backbone, so that backward reaches all stages."""
    return sum(o.float().square().mean() for o in outs)


def measure_memory(backbone: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Activation memory of one forward + backward step of a ConvNeur backbone.

    Args:
        backbone: a ConvNeur (``stages`` of blocks) in training mode.
        x: the input batch, on the backbone's device.

    Returns:
        ``saved``: bytes autograd saves for the backward pass (parameters
        excluded); ``largest_block``: the most of them saved by one block, held
        a second time while that block's backward runs (or recomputes it, with
        ``with_cp``); on CUDA also ``cuda_peak``: the allocator's peak over the
        step, less what was allocated before it.
    """
    blocks = {f'stage{i}.block{j}': block for i, stage in enumerate(backbone.stages)
              for j, block in enumerate(stage)}
    backbone.zero_grad(set_to_none=True)
    with SavedTensorMeter(exclude=backbone.parameters(), scopes=blocks) as meter:
        loss = outputs_loss(backbone(x))
    saved, largest = meter.total_bytes, max(meter.by_scope.values(), default=0)
    loss.backward()
    result = dict(saved=saved, largest_block=largest)
    if is_cuda(x.device):
        backbone.zero_grad(set_to_none=True)
        window = PeakMemoryGrowth(x.device)
        outputs_loss(backbone(x)).backward()
        result['cuda_peak'] = window.bytes()
    return result


# ------------------------------------------------------- checkpointing

def build_backbone(arch: str, device: str, with_cp: bool = False, recompute: bool = False,
                   chunk_size: int = 1024, max_lr: float = 0.2,
                   drop_path_rate: float = 0.1) -> torch.nn.Module:
    """The dense-prediction configs' ConvNeur backbone, in training mode."""
    from convneur_mm.apis.toolbox import quiet_init
    from convneur_mm.models import ConvNeur
    torch.manual_seed(0)
    model = ConvNeur(arch=arch, memory_cfg=dict(chunk_size=chunk_size, max_lr=max_lr,
                                                recompute=recompute),
                     drop_path_rate=drop_path_rate, out_indices=(0, 1, 2, 3),
                     gap_before_final_norm=False, with_cp=with_cp)
    with quiet_init():
        model.init_weights()
    return model.to(device).train()


def step_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` forward + backward steps after a warm-up."""
    def step():
        model.zero_grad(set_to_none=True)
        outputs_loss(model(x)).backward()
    return median(time_calls(step, repeats, x.device, warmup=1))


def checkpointing_rows(arch: str, device: str, batch: int = 2,
                       size: Sequence[int] = (512, 512), repeats: int = 3,
                       **backbone: float) -> Dict[str, Dict]:
    """Each of ``VARIANTS``' ``measure_memory`` and step time.

    Args:
        arch: the ConvNeur arch.
        device: where it runs.
        batch, size: the input batch and its (H, W).
        repeats: timed steps per variant.
        backbone: ``chunk_size``, ``max_lr``, ``drop_path_rate`` of ``build_backbone``.

    Returns:
        variant -> ``saved``, ``largest_block`` (bytes), ``peak_estimate``
        (bytes), ``time`` (s), on CUDA ``cuda_peak`` (bytes).
    """
    x = torch.randn(batch, 3, *size, device=device)
    rows = {}
    for name, variant in VARIANTS.items():
        model = build_backbone(arch, device, **variant, **backbone)
        rows[name] = dict(measure_memory(model, x), time=step_seconds(model, x, repeats))
        del model
    for name, row in rows.items():
        row['peak_estimate'] = row['saved'] + (rows['False']['largest_block']
                                               if VARIANTS[name]['with_cp'] else 0)
    return rows


def checkpointing_report(rows: Dict[str, Dict], batch: int) -> str:
    """Markdown table of ``checkpointing_rows`` and the savings in one line each."""
    cuda = 'cuda_peak' in rows['False']
    lines = ['| with_cp | activation memory saved for backward (MiB) | per image (MiB) | '
             'peak estimate (MiB) |' + (' CUDA peak (MiB) |' if cuda else '') + ' time (s) |',
             '|---|---|---|---|' + ('---|' if cuda else '') + '---|']
    for name, row in rows.items():
        lines.append(f'| {name} | {row["saved"] / MIB:.0f} | {row["saved"] / MIB / batch:.1f} | '
                     f'{row["peak_estimate"] / MIB:.0f} |'
                     + (f' {row["cuda_peak"] / MIB:.0f} |' if cuda else '')
                     + f' {row["time"]:.2f} |')
    plain, cp = rows['False'], rows['True']
    recompute = rows['False + memory recompute']
    lines += ['', f'with_cp keeps {cp["saved"] / plain["saved"]:.1%} of the saved activations '
              f'(peak estimate: {1 - cp["peak_estimate"] / plain["saved"]:.0%} less memory) at '
              f'{cp["time"] / plain["time"]:.2f}x the step time',
              f'memory recompute keeps {recompute["saved"] / plain["saved"]:.1%} of the saved '
              f'activations at {recompute["time"] / plain["time"]:.2f}x the step time']
    return '\n'.join(lines)


def imagenet_estimate(arch: str, batch: int = 2, size: int = 224) -> Dict[str, float]:
    """Bytes per image (activations + transient) and fixed bytes (16 per
    parameter) of the arch's ImageNet config under the fp16 stand-in."""
    from convneur_mm.analysis.fp16_headroom import cuda_fp16_stand_in
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model, quiet_init
    cfg = load_config(f'cls_convneur_{arch}_300e_in1k.py')
    with quiet_init():
        model = build_model(cfg, init=False)
    backbone = model.backbone.train()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    with cuda_fp16_stand_in():
        measured = measure_memory(backbone, x)
    params = sum(p.numel() for p in model.parameters())
    return dict(per_image=(measured['saved'] + measured['largest_block']) / batch,
                saved_per_image=measured['saved'] / batch, fixed=16 * params, params=params)


def fitting_batch(per_image: float, fixed: float, gpu_bytes: float, reserve: float) -> int:
    """The largest power of two whose step fits; 0 when not even a batch of 1 does."""
    if fixed + reserve + per_image > gpu_bytes:
        return 0
    batch = 1
    while fixed + reserve + 2 * batch * per_image <= gpu_bytes:
        batch *= 2
    return batch


def imagenet_batches(estimates: Dict[str, Dict[str, float]], gpu_gib: float = 24.0,
                     reserve_gib: float = 3.0, gpus: int = 8) -> Tuple[Dict[str, Dict], List[str]]:
    """Per arch: the per-GPU batch that fits, its peak and the gradient
    accumulation that keeps ``PAPER_BATCH``; and a warning for each arch whose
    global batch cannot be ``PAPER_BATCH`` with ``gpus``.

    Args:
        estimates: arch -> ``imagenet_estimate``.
        gpu_gib, reserve_gib: the card's memory and the part not for tensors.
        gpus: GPUs in the run.

    Returns:
        (arch -> the estimate with ``batch`` (0: none fits), ``peak_gib``,
        ``accumulative_counts``, ``global_batch``), warnings.
    """
    gpu, reserve = gpu_gib * GIB, reserve_gib * GIB
    rows, notes = {}, []
    for arch, e in estimates.items():
        batch = fitting_batch(e['per_image'], e['fixed'], gpu, reserve)
        peak = (e['fixed'] + reserve + max(batch, 1) * e['per_image']) / GIB
        if not batch:
            rows[arch] = dict(e, batch=0, accumulative_counts=None, global_batch=None,
                              peak_gib=peak)
            continue
        accumulate = max(1, PAPER_BATCH // (gpus * batch))
        global_batch = gpus * batch * accumulate
        rows[arch] = dict(e, batch=batch, accumulative_counts=accumulate,
                          global_batch=global_batch, peak_gib=peak)
        if global_batch != PAPER_BATCH:
            notes.append(f'warning: ConvNeur-{arch.upper()}: {gpus} GPUs x batch {batch} x '
                         f'accumulative_counts {accumulate} = global batch {global_batch}, '
                         f'not {PAPER_BATCH} (the batch the configs\' learning rate is '
                         f'for): scale the learning rate by {global_batch}/{PAPER_BATCH} '
                         'or use a GPU count whose product with the batch divides it')
    return rows, notes


def imagenet_table(rows: Dict[str, Dict]) -> str:
    """Markdown table of ``imagenet_batches``' rows."""
    from convneur_mm.utils.tables import markdown_table
    table = []
    for arch, r in rows.items():
        cells = [f'ConvNeur-{arch.upper()}', f'{r["params"] / 1e6:.2f}',
                 f'{r["saved_per_image"] / MIB:.1f}', f'{r["per_image"] / MIB:.1f}',
                 f'{r["fixed"] / MIB:.0f}']
        if r['batch']:
            cells += [r['batch'], f'{r["peak_gib"]:.1f}', r['accumulative_counts']]
        else:
            cells += [f'none fits (batch 1: {r["peak_gib"]:.1f} GiB)', f'{r["peak_gib"]:.1f}', '-']
        table.append(cells)
    return markdown_table(('model', 'params (M)', 'saved activations / image (MiB)',
                           'with transient (MiB)', 'weights + grads + AdamW (MiB)',
                           'per-GPU batch', 'estimated peak (GiB)', 'accumulative_counts'),
                          table)
