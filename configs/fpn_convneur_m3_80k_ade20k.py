# Semantic FPN with ConvNeur-M3, ADE20K, 80k iterations (paper Table 4).
# The paper's recipe: long side 2048 / short side 512, random 512x512 crops,
# 4 GPUs x 4 images (batch 16), AdamW lr 6e-5, betas (0.9, 0.999), weight decay
# 0.01, gradient clipping at max norm 1.0, lr x10 for neck and decode head,
# 1500-iteration linear warm-up, then polynomial decay until 80k iterations.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
]

# Read anywhere (MMEngine's inferencers load the weights before they build the
# model), this config imports convneur_mm: the backbone's registration and the
# checkpoint allow-list that lets torch's weights-only load read our checkpoints.
custom_imports = dict(imports=['convneur_mm'], allow_failed_imports=False)

# ---- per-task memory settings (our choice; the paper gives none) --------------
# chunk_size 1024: a 512x512 crop then has 16 / 4 / 1 / 1 chunks in stages 1-4,
# the profile the memory saw in ImageNet pre-training (224x224, chunk 196), so
# the learned decay and momentum act over the same number of writes.
# max_lr 0.2 = 196 / 1024: the chunk loss sums over its tokens, so this keeps
# the size of one write as in pre-training; dense per-pixel supervision, unlike
# detection's sparse boxes, needs no further damping.
memory_cfg = dict(chunk_size=1024, max_lr=0.2)

# ---- paths, all overridable without editing this file -------------------------
pretrained = '{{$CONVNEUR_PRETRAINED:none}}'
data_root = '{{$ADE20K_ROOT:data/ade/ADEChallengeData2016}}'

crop_size = (512, 512)
arch, dims = 'm3', [64, 128, 256, 512]
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='convneur_mm.ConvNeur',
        arch=arch,
        memory_cfg=memory_cfg,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        gap_before_final_norm=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=dims),
    decode_head=dict(num_classes=150))

train_dataloader = dict(batch_size=4, dataset=dict(data_root=data_root))  # x 4 GPUs
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    clip_grad=dict(max_norm=1.0, norm_type=2),
    paramwise_cfg=dict(custom_keys={
        'neck': dict(lr_mult=10.0),
        'decode_head': dict(lr_mult=10.0),
        'auxiliary_head': dict(lr_mult=10.0),
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=80000),
]
# lr 6e-5 is the paper's for a total batch of 16; --auto-scale-lr rescales it.
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Stop at the first non-finite loss or gradient, naming the iteration, the loss
# terms and the module group (docs/user_guides/train_and_test.md#non-finite-training).
custom_hooks = [dict(type='convneur_mm.NonFiniteStopHook')]
