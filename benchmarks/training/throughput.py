"""Training iterations of the real configs, ConvNeur beside the backbones a
user would pick instead: seconds per iteration, images per second, peak
memory, and whether a step fits a 24 GB card at the config's per-GPU batch.

Each job (``JOBS``) builds its config's model and ``optim_wrapper`` as
``tools/train.py`` does (MMEngine's builders; ``--amp`` through
``enable_amp``; ``--compile`` through ``convneur_mm.engine.compile``) and
feeds it a synthetic batch at the config's shapes and per-GPU batch:

* COCO: images resized with their ratio kept to 1333x800 (the resize's
  largest image), boxes and masks; the data preprocessor pads them to 32;
* ADE20K: the 512x512 crops, with per-pixel labels;
* ImageNet: the 224x224 crops, with labels (Mixup and CutMix run as configured).

The batch goes through the model's data preprocessor and ``train_step``:
forward, loss, backward and the optimizer step, data loading excluded. The
peers (``PEERS``) are config overrides of the same job: ConvNeur local-only
(``memory_placement='none'``), MMPretrain's ConvNeXt-V2 of the same widths
and the base config's ResNet-50, the neck's and heads' input widths changed
to match (``DEFAULT_PEERS``), and on request ConvNeur with every memory on
the Triton kernels (``kernels``: the training path 'auto' would take where
a GPU measured it faster), skipped where they cannot run. All variants of a
job live on the device together and are timed in turns (``time_in_turns``).

Two choices keep every timed iteration the same work: the learning rate is
0 (the weights stay at their initialization, so a random-init detector does
not diverge into NaN boxes; the optimizer's arithmetic runs as at any rate),
and gradient accumulation is off (the ImageNet recipe accumulates 8
iterations per step; here every iteration steps).

Evaluation (``evaluate``) times ``test_step`` (preprocessing, inference,
post-processing) at the test pipeline's shape and batch: COCO 1333x800 at
one image, ADE20K 512x2048 as the config's ``test_cfg`` says (whole image or
sliding window). Detectors keep their ``max_per_img`` detections (score
threshold 0), as a trained detector does, where random weights would keep
none and skip the mask head.

Peak memory: on CUDA the allocator's peak over the iteration, plus what the
variant holds between iterations (weights, buffers, optimizer state), both
allocated and reserved (the cache emptied first); on a CPU the resident
set's growth plus what the variant holds, and no reserved figure.
"""
import argparse
import gc
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from mmengine.config import Config, ConfigDict
from torch import nn

from convneur_mm.analysis.timing import (PeakMemoryGrowth, is_cuda, median, relative_spread,
                                         setup_benchmark_device, time_in_turns)
from benchmarks.common.record import Record
from benchmarks.common.subjects import describe_error, pytorch_path_forced
from convneur_mm.apis.launch import enable_amp, load_config
from convneur_mm.apis.toolbox import data_sample, build_model, import_toolbox, quiet_init
from convneur_mm.engine.compile import (accumulative_counts, add_compile_argument,
                                        bucket_detection_sizes, compile_model, find_resize_scale,
                                        training_compile_mode)
from convneur_mm.utils.cli import positive_int
from convneur_mm.utils.tables import markdown_table

GIB = 2**30
CARD_BYTES = 24 * GIB  # the paper's RTX 3090
# the CUDA context and kernels' code live outside the allocator's statistics:
# our allowance, not measured
CONTEXT_BYTES = GIB
RESNET50_WIDTHS = (256, 512, 1024, 2048)  # its four stages' outputs (bottleneck x4)
CONVNEXTV2_NAMES = {'atto': 'A', 'femto': 'F', 'pico': 'P', 'nano': 'N'}


class Job(NamedTuple):
    """A config, the base config whose ResNet-50 is its peer, and the
    ConvNeXt-V2 of ConvNeur's widths (None where MMPretrain has none)."""
    config: str
    resnet_config: str
    convnextv2: Optional[str]


JOBS = {
    'cascade-m2': Job('cascade_rcnn_convneur_m2_1x_coco.py',
                      'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py', 'femto'),
    'cascade-m3': Job('cascade_rcnn_convneur_m3_1x_coco.py',
                      'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py', 'pico'),
    'fpn-m3': Job('fpn_convneur_m3_80k_ade20k.py', 'mmseg::_base_/models/fpn_r50.py', 'pico'),
    'upernet-m4': Job('upernet_convneur_m4_80k_ade20k.py', 'mmseg::_base_/models/upernet_r50.py',
                      'nano'),
    'cls-m3': Job('cls_convneur_m3_300e_in1k.py', 'mmpretrain::_base_/models/resnet50.py',
                  'pico'),
}
PEERS = ('local-only', 'convnextv2', 'resnet50', 'kernels')
# the peers a run takes unless told: the kernels' row only where asked (a GPU's)
DEFAULT_PEERS = PEERS[:3]

# the dry mode's (train, test) image sizes, (H, W): stage 1 still has
# several memory chunks at the classification and segmentation chunk sizes
DRY_SIZES = {'mmdet': ((96, 128), (96, 128)), 'mmseg': ((64, 64), (64, 128)),
             'mmpretrain': ((64, 64), (64, 64))}
DRY_ITERS, DRY_WARMUP = 1, 0
# timed turns: enough for a median and its spread that five turns did not give
# (Cascade M2 then timed slower than the larger M3); odd, for a true middle
ITERS = 21
# UperNet's pyramid pooling pools to 1x1, where BatchNorm in training needs
# more than one image
DRY_BATCH = {'mmdet': 1, 'mmseg': 2, 'mmpretrain': 1}
INSTANCES_PER_IMAGE = 8  # COCO's mean is 7.3
NUM_STUFF_CLASSES = 150  # ADE20K


# ------------------------------------------------------------------ configs

def _is_pretrained(init_cfg) -> bool:
    return isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'


def _retarget_widths(model_cfg, old: Sequence[int], new: Sequence[int]) -> None:
    """Input widths of the neck and heads that read the backbone: a list
    equal to ``old`` becomes ``new``; a single width becomes ``new`` at the
    head's ``in_index`` (a classifier's head: the last)."""
    for part in ('neck', 'decode_head', 'auxiliary_head', 'head'):
        heads = model_cfg.get(part)
        for head in heads if isinstance(heads, (list, tuple)) else [heads]:
            if not isinstance(head, dict) or 'in_channels' not in head:
                continue
            width = head['in_channels']
            if isinstance(width, (list, tuple)) and list(width) == list(old):
                head['in_channels'] = list(new)
            elif isinstance(width, int):
                index = head.get('in_index', -1)
                if isinstance(index, int) and width == old[index]:
                    head['in_channels'] = new[index]


def _swap_backbone(cfg: Config, backbone: dict, widths: Sequence[int],
                   neck: Optional[dict] = None) -> None:
    from convneur_mm.models import ConvNeur
    old = cfg.model.backbone
    arch = ConvNeur.arch_settings[str(old.get('arch', 'm3')).lower()]
    cfg.model.backbone = ConfigDict(backbone)
    if neck is not None and not cfg.model.get('neck'):
        cfg.model.neck = neck
    _retarget_widths(cfg.model, arch['dims'], widths)


def convnextv2_backbone(arch: str, convneur: dict) -> dict:
    """MMPretrain's ConvNeXt-V2 (GRN, no layer scale) with ConvNeur's outputs."""
    return dict(type='mmpretrain.ConvNeXt', arch=arch, use_grn=True, layer_scale_init_value=0.,
                drop_path_rate=convneur.get('drop_path_rate', 0.),
                out_indices=convneur.get('out_indices', -1),
                gap_before_final_norm=convneur.get('gap_before_final_norm', True))


def variant_config(job: Job, peer: Optional[str] = None) -> Config:
    """The job's config, or a peer's (``PEERS``): local-only by the
    backbone's ``memory_placement``; ConvNeXt-V2 and ResNet-50 swapped in for
    the backbone (ResNet-50 as the base config has it, its checkpoint left
    out: nothing downloads), the widths that read it changed to match;
    'kernels': ConvNeur with ``memory_cfg.implementation='triton'`` (every
    memory through the Triton kernels and their backward kernels, whatever
    'auto' would take; a decomposed read's projections too, their queries
    exact)."""
    cfg = load_config(job.config)
    if peer is None:
        return cfg
    if peer == 'local-only':
        cfg.merge_from_dict({'model.backbone.memory_placement': 'none'})
    elif peer == 'kernels':
        cfg.merge_from_dict({'model.backbone.memory_cfg.implementation': 'triton'})
    elif peer == 'convnextv2':
        if job.convnextv2 is None:
            raise ValueError(f'{job.config} has no ConvNeXt-V2 of its widths')
        import_toolbox('mmpretrain')  # 'mmpretrain.ConvNeXt' in another toolbox's model
        from mmpretrain.models import ConvNeXt
        widths = ConvNeXt.arch_settings[job.convnextv2]['channels']
        _swap_backbone(cfg, convnextv2_backbone(job.convnextv2, cfg.model.backbone), widths)
    elif peer == 'resnet50':
        base = load_config(job.resnet_config).model
        backbone = base.backbone.to_dict()
        if _is_pretrained(backbone.get('init_cfg')):
            backbone['init_cfg'] = None
        # a ConvNeur classifier pools in its backbone; ResNet needs the base's neck
        _swap_backbone(cfg, backbone, RESNET50_WIDTHS, base.get('neck'))
    else:
        raise ValueError(f'peer must be one of {PEERS}, got {peer!r}')
    return cfg


def variant_name(job: Job, peer: Optional[str], arch: str) -> str:
    """'ConvNeur-M3', 'ConvNeur-M3 local-only', 'ConvNeXt-V2-P', 'ResNet-50',
    'ConvNeur-M3 kernels'."""
    arch = arch.upper()
    return {None: f'ConvNeur-{arch}', 'local-only': f'ConvNeur-{arch} local-only',
            'kernels': f'ConvNeur-{arch} kernels',
            'convnextv2': f'ConvNeXt-V2-{CONVNEXTV2_NAMES.get(job.convnextv2, "?")}',
            'resnet50': 'ResNet-50'}[peer]


def prepare_training(cfg: Config, amp: bool = False, amp_dtype: Optional[str] = None,
                     compile_mode: Optional[str] = None) -> Config:
    """What ``tools/train.py`` does to the config (``--amp``; for
    ``--compile`` the detection buckets), and the two fixed-work choices of
    this benchmark: lr 0 and no gradient accumulation."""
    if amp:
        enable_amp(cfg, amp_dtype)
    if compile_mode:
        bucket_detection_sizes(cfg)
    cfg.optim_wrapper.accumulative_counts = 1
    cfg.optim_wrapper.optimizer.lr = 0.0
    return cfg


# ------------------------------------------------------------------ shapes

def _transform_arg(node, type_name: str, key: str):
    """``key`` of the first transform of type ``type_name`` in a (wrapped)
    dataset config."""
    if isinstance(node, dict):
        if node.get('type') == type_name and key in node:
            return node[key]
        children = node.values()
    elif isinstance(node, (list, tuple)):
        children = node
    else:
        return None
    return next((found for found in (_transform_arg(c, type_name, key) for c in children)
                 if found is not None), None)


def _square(size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def image_sizes(cfg: Config) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(H, W) of a training and a test image as the pipelines give them: a
    keep-ratio resize's largest image (short x long side), a crop's size."""
    scope = cfg.default_scope

    def resized(split: str) -> Tuple[int, int]:
        scale = find_resize_scale(cfg[split].dataset)
        if scale is None:
            raise ValueError(f'no keep-ratio Resize in {split} of {cfg.filename}')
        return min(scale), max(scale)

    if scope == 'mmdet':
        return resized('train_dataloader'), resized('test_dataloader')
    if scope == 'mmseg':
        return _square(cfg.model.data_preprocessor.size), resized('test_dataloader')
    train = _transform_arg(cfg.train_dataloader.dataset, 'RandomResizedCrop', 'scale')
    test = _transform_arg(cfg.test_dataloader.dataset, 'CenterCrop', 'crop_size')
    if train is None or test is None:
        raise ValueError(f'no RandomResizedCrop / CenterCrop in the pipelines of {cfg.filename}')
    return _square(train), _square(test)


# ------------------------------------------------------------------ batches

def synthetic_batch(cfg: Config, size: Tuple[int, int], batch: int, training: bool,
                    device='cpu', seed: int = 0) -> dict:
    """Random images of ``size`` (H, W) as the toolbox's data samples, on
    ``device`` (no transfer in the timed step), with ground truth for
    training: COCO-like boxes, labels and masks; per-pixel labels; a class."""
    scope = cfg.default_scope
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    inputs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen).to(device)
              for _ in range(batch)]
    samples = []
    for _ in range(batch):
        sample = data_sample(scope, size)
        if training:
            _add_ground_truth(sample, cfg, size, gen)
        samples.append(sample.to(device))
    return dict(inputs=inputs, data_samples=samples)


def _add_ground_truth(sample, cfg: Config, size: Tuple[int, int], gen: torch.Generator) -> None:
    h, w = size
    scope = cfg.default_scope
    if scope == 'mmdet':
        import numpy as np
        from mmdet.structures.bbox import HorizontalBoxes
        from mmdet.structures.mask import BitmapMasks
        from mmengine.structures import InstanceData
        n = INSTANCES_PER_IMAGE
        corners = torch.rand(n, 2, 2, generator=gen) * torch.tensor([w, h])
        boxes = torch.cat([corners.min(1).values, corners.max(1).values + 8], 1)
        boxes = torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=boxes.dtype))
        masks = np.zeros((n, h, w), dtype=np.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        classes = cfg.model.roi_head.bbox_head[0].num_classes
        sample.gt_instances = InstanceData(
            bboxes=HorizontalBoxes(boxes), labels=torch.randint(0, classes, (n, ), generator=gen),
            masks=BitmapMasks(masks, h, w))
    elif scope == 'mmseg':
        from mmengine.structures import PixelData
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, NUM_STUFF_CLASSES, (1, h, w), generator=gen))
    else:
        sample.set_gt_label(int(torch.randint(0, cfg.model.head.num_classes, (1, ),
                                              generator=gen)))


# ------------------------------------------------------------------ variants

class Variant(NamedTuple):
    """A built model and its optimizer wrapper, with the config they came
    from; ``after_step`` (``guard``) takes each step's outputs."""
    name: str
    cfg: Config
    model: nn.Module
    optim_wrapper: object
    after_step: Optional[Callable[[dict], None]] = None


GUARDED = ' + NonFiniteStopHook'


def guard(variant: Variant) -> Variant:
    """The variant with the configs' ``NonFiniteStopHook`` (as they set it:
    no group norms) driven as the runner drives it: ``before_train`` puts its
    gradient check before every optimizer step and its loss recorder on the
    forward; its loss check runs after each step."""
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    from convneur_mm.engine.finite_check import NonFiniteStopHook
    hook = NonFiniteStopHook()
    runner = SimpleNamespace(model=variant.model, optim_wrapper=variant.optim_wrapper,
                             message_hub=MessageHub.get_current_instance(), iter=0, epoch=0)
    hook.before_train(runner)
    return variant._replace(
        name=variant.name + GUARDED,
        after_step=lambda outputs: hook.after_train_iter(runner, 0, outputs=outputs))


def build_variant(name: str, cfg: Config, device, compile_mode: Optional[str] = None,
                  backend: str = 'inductor', accumulation: int = 1) -> Variant:
    """The config's model on ``device`` (SyncBN reverted to BN, as MMEngine's
    runner does without a process group) and its optimizer wrapper, built by
    MMEngine's builder as the runner builds it; compiled as ``--compile``
    compiles (``accumulation``: the config's own, which picks the mode)."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    with quiet_init():  # also the optimizer constructor's line per parameter
        model = revert_sync_batchnorm(build_model(cfg, init=True)).to(device)
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    if compile_mode:
        compile_model(model, mode=compile_mode, backend=backend,
                      training_mode=training_compile_mode(compile_mode, accumulation))
    return Variant(name, cfg, model, optim_wrapper)


def held_bytes(model: nn.Module, optim_wrapper=None, data: Optional[dict] = None) -> int:
    """Bytes on the model's device that a step needs before it starts:
    weights, buffers, the optimizer's state (gradients are freed by each
    step's zero_grad) and the batch's images."""
    device = next(model.parameters()).device
    tensors = list(model.parameters()) + list(model.buffers()) + list(
        (data or {}).get('inputs', []))
    if optim_wrapper is not None:
        tensors += [value for state in optim_wrapper.optimizer.state.values()
                    for value in state.values() if isinstance(value, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if t.device == device}
    return sum(storages.values())


def measure_peak(fn, device, held: int) -> Dict[str, Optional[int]]:
    """Peak bytes of one call of ``fn`` over what was allocated before it,
    plus ``held``: allocated, and reserved on CUDA (the cache emptied first,
    so the reserved growth is what this call needed)."""
    cuda = is_cuda(device)
    if cuda:
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved(torch.device(device))
    window = PeakMemoryGrowth(device)  # resets both peaks on CUDA
    fn()
    allocated = held + window.bytes()
    # the cache's segments that stayed (partly used by what is held) may take
    # some of the call's blocks: the reserved figure is at least the allocated
    reserved = (max(allocated, held + torch.cuda.max_memory_reserved(torch.device(device))
                    - reserved_before) if cuda else None)
    return dict(held_bytes=held, peak_allocated_bytes=allocated, peak_reserved_bytes=reserved)


def fits_card(peak: Dict[str, Optional[int]], card_bytes: int = CARD_BYTES) -> bool:
    """Whether the peak (reserved where measured, else allocated) plus the
    CUDA context fits a card of ``card_bytes``."""
    used = peak['peak_reserved_bytes']
    if used is None:
        used = peak['peak_allocated_bytes']
    return used + CONTEXT_BYTES <= card_bytes


def _refill(device) -> int:
    """Untimed turns after the memory windows: one on CUDA, whose caching
    allocator they emptied (else the first timed turn pays for cudaMalloc)."""
    return 1 if is_cuda(device) else 0


def _guarded_step(v: Variant, data: dict, stops: Dict[str, str]) -> Callable[[], None]:
    """A guarded variant's step: a stop of its hook is recorded in ``stops``
    (its row then says so) instead of ending the other variants' turns."""
    from convneur_mm.engine.finite_check import NonFiniteTrainingError

    def step() -> None:
        try:
            v.after_step(v.model.train_step(data, v.optim_wrapper))
        except NonFiniteTrainingError as error:
            stops.setdefault(v.name, f'stopped by NonFiniteStopHook: {error}')
    return step


def measure_training(variants: List[Variant], data: dict, batch: int, device, iters: int,
                     warmup: int) -> Dict[str, dict]:
    """s/iter, images/s and peak memory of ``train_step`` on ``data``, the
    variants in turns: ``warmup`` untimed turns, then one memory window per
    variant, then ``iters`` timed turns (on CUDA after one untimed turn that
    refills the cache the windows emptied). A guarded variant's step ends
    with its hook's loss check (``after_step``)."""
    rows: Dict[str, dict] = {}
    steps, stops = {}, {}
    for v in variants:
        v.model.train()
        steps[v.name] = (lambda v=v: v.model.train_step(data, v.optim_wrapper))
        if v.after_step is not None:
            steps[v.name] = _guarded_step(v, data, stops)
    failed: Dict[str, str] = {}
    for _ in range(warmup):
        for name, step in list(steps.items()):
            _or_failed(step, name, steps, failed)
    for v in variants:
        if v.name not in steps:  # failed in the warm-up
            continue
        peak = _or_failed(lambda v=v: measure_peak(
            steps[v.name], device, held_bytes(v.model, v.optim_wrapper, data)),
            v.name, steps, failed)
        if peak is not None:
            rows[v.name] = dict(peak, fits_24gb=fits_card(peak), batch=batch)
    times = time_in_turns(steps, iters, device, warmup=_refill(device)) if steps else {}
    for name, seconds in times.items():
        s = median(seconds)
        rows[name].update(status=stops.get(name, 'ok'), s_per_iter=s, s_all=seconds,
                          spread=relative_spread(seconds), images_per_s=batch / s)
    rows.update({name: dict(status=why, batch=batch) for name, why in failed.items()})
    return rows


def _or_failed(call: Callable[[], object], name: str, steps: Dict[str, Callable[[], None]],
               failed: Dict[str, str]) -> object:
    """``call()``; where it raises (a variant's compile error or OOM in the
    warm-up or its memory window), the variant ``name`` leaves ``steps``
    with its error in ``failed``: its row says so, and the other variants'
    rows stand."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - recorded in the variant's row
        failed[name] = describe_error(exc)
        del steps[name]
    # out of the handler, whose traceback holds the failed step's tensors: an
    # OOM's leftovers must not crowd the others
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def measure_evaluation(variants: List[Variant], data: dict, batch: int, device, iters: int,
                       warmup: int, amp: bool = False,
                       amp_dtype: Optional[str] = None) -> Dict[str, dict]:
    """s/image and peak memory of ``test_step`` (as ``tools/test.py`` runs
    it: no gradients, ``--amp`` as MMEngine's test loop's autocast, in
    ``amp_dtype`` where given)."""
    from mmengine.runner.amp import autocast
    dtype = getattr(torch, amp_dtype) if amp_dtype else None

    def step(v: Variant):
        def call():
            with torch.no_grad(), autocast(enabled=amp, dtype=dtype):
                v.model.test_step(data)
        return call

    variants = [v for v in variants if v.after_step is None]  # the hook only trains
    steps = {}
    for v in variants:
        v.model.eval()
        steps[v.name] = step(v)
    for _ in range(warmup):
        for call in steps.values():
            call()
    rows = {v.name: measure_peak(steps[v.name], device, held_bytes(v.model, data=data))
            for v in variants}
    for name, seconds in time_in_turns(steps, iters, device, warmup=_refill(device)).items():
        rows[name].update(status='ok', batch=batch, s_per_image=median(seconds) / batch,
                          s_all=seconds, spread=relative_spread(seconds))
    return rows


# ------------------------------------------------------------------ jobs

def run_job(name: str, peers: Sequence[str] = DEFAULT_PEERS, device='cpu', amp: bool = False,
            amp_dtype: Optional[str] = None, compile_mode: Optional[str] = None,
            backend: str = 'inductor', iters: int = ITERS, warmup: int = 2,
            evaluate: bool = False, dry: bool = False, guarded: bool = False) -> dict:
    """One job of ``JOBS``: its config and peers built, trained in turns
    and, with ``evaluate``, evaluated in turns.

    Args:
        name: a key of ``JOBS``.
        peers: a subset of ``PEERS`` (ConvNeXt-V2 is skipped where the job
            has none).
        device: where the models run.
        amp, amp_dtype: ``tools/train.py``'s ``--amp`` and ``--amp-dtype``.
        compile_mode: ``--compile``'s mode; each variant is then timed eager
            and compiled.
        backend: ``torch.compile``'s backend ('eager' traces only: dry runs).
        iters, warmup: timed and untimed turns.
        evaluate: also time ``test_step`` at the test pipeline's shape and batch.
        dry: tiny images (``DRY_SIZES``) and batches (``DRY_BATCH``).
        guarded: also train ConvNeur, eager, with ``NonFiniteStopHook``
            (``guard``), a model of its own timed in the same turns; its row
            gives ``vs_unguarded``.

    Returns:
        The job's settings and, per variant, its ``train`` (and ``eval``)
        row; a variant that fails to build records its error.
    """
    if name not in JOBS:
        raise ValueError(f'job must be one of {tuple(JOBS)}, got {name!r}')
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ValueError(f'peers must be among {PEERS}, got {unknown}')
    job = JOBS[name]
    base = load_config(job.config)
    scope = base.default_scope
    arch = str(base.model.backbone.get('arch', 'm3'))
    train_size, test_size = DRY_SIZES[scope] if dry else image_sizes(base)
    per_gpu = base.train_dataloader.batch_size
    test_batch = base.test_dataloader.batch_size
    batch, eval_batch = (DRY_BATCH[scope], 1) if dry else (per_gpu, test_batch)
    result = dict(config=job.config, scope=scope, per_gpu_batch=per_gpu, batch=batch,
                  train_size=list(train_size), eval_batch=eval_batch, eval_size=list(test_size),
                  amp=amp, compile=compile_mode, train={}, eval=None, errors={})
    variants: List[Variant] = []
    for peer in (None, ) + tuple(p for p in PEERS if p in peers):
        if peer == 'convnextv2' and job.convnextv2 is None:
            continue
        title = variant_name(job, peer, arch)
        why = _kernels_unavailable(device) if peer == 'kernels' else None
        if why is not None:  # a failing step would end every variant's turns
            result['errors'][title] = f'skipped: the kernels cannot run here ({why})'
            continue
        for mode in (None, compile_mode) if compile_mode else (None, ):
            label = f'{title} compiled' if mode else title
            try:
                cfg = variant_config(job, peer)
                accumulation = accumulative_counts(cfg)
                if dry and scope == 'mmseg':  # the preprocessor pads to the crop
                    cfg.model.data_preprocessor.size = train_size
                if evaluate and (cfg.model.get('test_cfg') or {}).get('rcnn'):
                    cfg.model.test_cfg.rcnn.score_thr = 0.0  # max_per_img detections kept
                prepare_training(cfg, amp, amp_dtype, mode)
                variants.append(build_variant(label, cfg, device, mode, backend, accumulation))
            except Exception as exc:  # noqa: BLE001  (the other variants still run)
                result['errors'][label] = describe_error(exc)
                continue
            if guarded and peer is None and mode is None:
                try:
                    variants.append(guard(build_variant(label, cfg, device)))
                except Exception as exc:  # noqa: BLE001
                    result['errors'][label + GUARDED] = describe_error(exc)
    if not variants:
        return result
    if evaluate:
        eval_data = synthetic_batch(base, test_size, eval_batch, False, device)
        result['eval'] = _guarded(lambda: measure_evaluation(
            variants, eval_data, eval_batch, device, iters, warmup, amp, amp_dtype))
    data = synthetic_batch(base, train_size, batch, True, device)
    result['train'] = _guarded(lambda: measure_training(variants, data, batch, device, iters,
                                                        warmup))
    local_only = variant_name(job, 'local-only', arch)
    for name, row in result['train'].items():
        # compiled rows against the compiled local-only network
        reference = result['train'].get(
            local_only + (' compiled' if name.endswith(' compiled') else ''), {})
        if row.get('status') == 'ok' and reference.get('status') == 'ok':
            row['vs_local_only'] = row['s_per_iter'] / reference['s_per_iter']
        plain = result['train'].get(name[:-len(GUARDED)], {})
        if name.endswith(GUARDED) and row.get('status') == 'ok' and plain.get('status') == 'ok':
            row['vs_unguarded'] = row['s_per_iter'] / plain['s_per_iter']
    del variants
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
    return result


def _kernels_unavailable(device) -> Optional[str]:
    """Why the memory's Triton kernels cannot run on ``device``, or None;
    under ``CONVNEUR_MEMORY_IMPLEMENTATION=torch`` (a rerun after a fault) a
    'kernels' row would time the PyTorch path under the kernels' name."""
    from convneur_mm.models.layers.memory_ops.kernels import unavailable_reason
    return pytorch_path_forced() or unavailable_reason(device)


def _guarded(measure) -> dict:
    """The rows of ``measure()``, or one ``error`` row where it fails: a
    failed evaluation keeps the training figures, a failed job the others'."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001
        return {'all': dict(status=describe_error(exc))}


def run(jobs: Sequence[str] = tuple(JOBS), peers: Sequence[str] = DEFAULT_PEERS,
        device: Optional[str] = None, amp: bool = False, amp_dtype: Optional[str] = None,
        compile_mode: Optional[str] = None, backend: str = 'inductor',
        iters: Optional[int] = None, warmup: Optional[int] = None, evaluate: bool = False,
        dry: bool = False, on_job: Optional[Callable[[dict], None]] = None,
        guarded: bool = False) -> dict:
    """Every job of ``jobs`` (``run_job``), with the device line.

    Args:
        device: default CUDA where there is one, else the CPU; the CPU in
            the dry mode.
        iters, warmup: default ``ITERS`` and 2; 1 and 0 in the dry mode.
        on_job: called after each job with the result so far, its last job
            the one just measured (a run cut short keeps what it printed).
        Others: see ``run_job``.
    """
    device = device or ('cuda' if torch.cuda.is_available() and not dry else 'cpu')
    if amp and torch.cuda.is_available() != is_cuda(device):
        # enable_amp picks the wrapper by the machine, as tools/train.py does
        raise ValueError(f'--amp on {device} of a machine '
                         f'{"with" if torch.cuda.is_available() else "without"} a GPU: '
                         'tools/train.py trains on the GPU where there is one')
    iters = iters or (DRY_ITERS if dry else ITERS)
    warmup = (DRY_WARMUP if dry else 2) if warmup is None else warmup
    out = dict(device=setup_benchmark_device(device), torch=torch.__version__, dry=dry,
               iters=iters, warmup=warmup, card_bytes=CARD_BYTES, context_bytes=CONTEXT_BYTES,
               jobs={})
    for name in jobs:
        out['jobs'][name] = run_job(name, peers, device, amp, amp_dtype, compile_mode, backend,
                                    iters, warmup, evaluate, dry, guarded)
        if on_job is not None:
            on_job(out)
    return out


# ------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This case's options (the runner adds ``--dry-run`` and ``--json``)."""
    parser.add_argument('--jobs', nargs='+', choices=list(JOBS), default=list(JOBS))
    parser.add_argument('--peers', nargs='*', choices=list(PEERS), default=list(DEFAULT_PEERS),
                        help='the backbones beside ConvNeur (none: ConvNeur alone; '
                        f'default {" ".join(DEFAULT_PEERS)}); kernels: ConvNeur with '
                        "memory_cfg.implementation='triton'")
    parser.add_argument('--amp', action='store_true',
                        help="mixed precision as tools/train.py's --amp")
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'],
                        help='autocast dtype for --amp (GPU default float16)')
    add_compile_argument(parser)
    parser.add_argument('--iters', type=positive_int,
                        help=f'timed turns ({ITERS}; dry run {DRY_ITERS})')
    parser.add_argument('--warmup', type=int, help='untimed turns first (2; dry run 0)')
    parser.add_argument('--eval', action='store_true',
                        help="also time test_step at the test pipeline's shape and batch")
    parser.add_argument('--device', help='default: cuda where there is one, else cpu')
    parser.add_argument('--guarded', action='store_true',
                        help='also ConvNeur with the configs\' NonFiniteStopHook, timed in '
                        'the same turns: its cost per iteration')


def run_from_args(args: argparse.Namespace, record: Record) -> dict:
    """``run`` with the parsed options; prints the tables; returns the result."""
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f'--warmup must be >= 0, got {args.warmup}')
    def print_last_job(out: dict) -> None:
        record.write(out)  # a run cut short keeps the jobs it measured
        name, job = list(out['jobs'].items())[-1]
        print(format_tables(dict(out, jobs={name: job})), file=sys.stderr, flush=True)

    result = run(args.jobs, args.peers, args.device, args.amp, args.amp_dtype, args.compile,
                 'eager' if args.dry_run and args.compile else 'inductor', args.iters,
                 args.warmup, args.eval, args.dry_run, print_last_job, args.guarded)
    print(format_tables(result))
    return result


def _percent(fraction: float) -> str:
    return f'{100 * fraction:.1f}%'


def _gib(value: Optional[float]) -> str:
    return '-' if value is None else f'{value / GIB:.2f}'


def format_tables(result: dict) -> str:
    """The training table, then the evaluation table where there is one."""
    lines = [f'device: {result["device"]}; torch {result["torch"]}'
             + ('; dry run' if result['dry'] else '')]
    train, evaluation, guards = [], [], []
    for job, r in result['jobs'].items():
        for name, row in r['train'].items():
            if row.get('status') != 'ok':
                train.append((job, name, row.get('status'), *['-'] * 7))
                continue
            ratio = row.get('vs_local_only')
            train.append((job, name, f'{row["s_per_iter"]:.4g}', _percent(row['spread']),
                          f'{row["images_per_s"]:.3g}',
                          _gib(row['peak_allocated_bytes']), _gib(row['peak_reserved_bytes']),
                          'yes' if row['fits_24gb'] else 'no', row['batch'],
                          '-' if ratio is None else f'{ratio:.2f}x'))
            if 'vs_unguarded' in row:
                extra = row['s_per_iter'] - r['train'][name[:-len(GUARDED)]]['s_per_iter']
                guards.append(f'{job}: {name} takes {row["vs_unguarded"]:.3f}x the unguarded '
                              f'model\'s s/iter ({extra:+.4g} s)')
        for name, error in r['errors'].items():
            train.append((job, name, error, *['-'] * 7))
        for name, row in (r['eval'] or {}).items():
            timed = 's_per_image' in row
            evaluation.append((job, name, f'{row["s_per_image"]:.4g}' if timed
                               else row.get('status'),
                               _percent(row['spread']) if timed else '-', row.get('batch', '-'),
                               _gib(row.get('peak_allocated_bytes')),
                               _gib(row.get('peak_reserved_bytes'))))
    lines.append(markdown_table(('job', 'model', 's/iter', 'spread', 'images/s',
                                 'peak allocated GiB', 'peak reserved GiB', 'fits 24 GB',
                                 'batch', 'vs local-only'), train))
    lines += [''] + guards if guards else []
    if evaluation:
        lines += ['', markdown_table(('job', 'model', 's/image', 'spread', 'batch',
                                      'peak allocated GiB', 'peak reserved GiB'), evaluation)]
    lines.append('spread: the timed turns\' interquartile range over their median')
    return '\n'.join(lines)

