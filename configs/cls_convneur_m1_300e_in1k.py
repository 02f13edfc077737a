# ConvNeur-M1 on ImageNet-1K at 224x224 (paper Table 2 and Sec. 4.1).
# The paper's recipe: 300 epochs, AdamW lr 4e-3 at global batch 4096, eps 1e-8,
# weight decay 0.05, no gradient clipping, no layer decay, 20 warm-up epochs,
# cosine decay to 1e-6; DeiT-style RandAugment, Mixup, CutMix, Random Erasing
# and label smoothing (the MMPretrain Swin/DeiT pipeline).
# The paper's batch of 4096 on its 8 GPUs is 512 images per GPU, which fits no
# GPU (docs/notes/benchmarks.md#imagenet-per-gpu-memory-estimate). Here it is 8 GPUs x `batch` x
# `accumulate` (gradient accumulation): `batch` fits a 24 GB GPU with --amp,
# with a margin, by an estimate (tools/analysis_tools/benchmark.py --task
# checkpointing --per-gpu-batch, docs/user_guides/cuda.md). Without --amp halve `batch` and double `accumulate`. On another
# number of GPUs pass --auto-scale-lr: base_batch_size is the batch of one
# optimizer step on 8 GPUs divided by `accumulate`, so MMEngine's linear rule
# (which does not see the accumulation) scales the lr to the effective batch.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]

# Read anywhere (MMEngine's inferencers load the weights before they build the
# model), this config imports convneur_mm: the backbone's registration and the
# checkpoint allow-list that lets torch's weights-only load read our checkpoints.
custom_imports = dict(imports=['convneur_mm'], allow_failed_imports=False)

# ---- per-task memory settings (paper Table 1): chunk 196, inner step size 1 ----
memory_cfg = dict(chunk_size=196, max_lr=1.0)

# ---- model size: arch, last-stage width, stochastic depth ----------------------
# Drop-path rates (our choice; the paper gives none): small models underfit
# rather than overfit at 300 epochs, so the rate grows with capacity, as in
# DeiT-T/S and ConvNeXt-V2 atto..nano: M1 0.05, M2 0.05, M3 0.1, M4 0.15.
arch, width, drop_path_rate = 'm1', 320, 0.05

# ---- per-GPU batch x gradient accumulation x 8 GPUs = 4096 ----------------------
batch, accumulate = 128, 4

data_root = '{{$IMAGENET_ROOT:data/imagenet}}'

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='convneur_mm.ConvNeur',
        arch=arch,
        memory_cfg=memory_cfg,
        drop_path_rate=drop_path_rate,
        out_indices=(3, ),
        gap_before_final_norm=True),  # global average pool -> LayerNorm
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=width,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        init_cfg=dict(type='TruncNormal', layer='Linear', std=.02, bias=0.)),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]))

train_dataloader = dict(batch_size=batch, dataset=dict(data_root=data_root))  # x 8 GPUs
val_dataloader = dict(batch_size=256, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=4e-3, eps=1e-8, betas=(0.9, 0.999), weight_decay=0.05),
    accumulative_counts=accumulate,
    clip_grad=None,
    # no decay on norms, biases, GRN and the memory's scale offsets
    paramwise_cfg=dict(
        norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0,
        custom_keys={'_gamma': dict(decay_mult=0.0), 'init_g': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=20,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
auto_scale_lr = dict(base_batch_size=8 * batch)  # x accumulate = 4096

# Stop at the first non-finite loss or gradient, naming the iteration, the loss
# terms and the module group (docs/user_guides/train_and_test.md#non-finite-training).
custom_hooks = [dict(type='convneur_mm.NonFiniteStopHook')]
