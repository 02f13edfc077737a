# Semantic FPN with ConvNeur-M2 on the tiny synthetic ADE20K of
# `python -m convneur_mm.demo_data.ade20k data/ade20k_tiny/` (tools/demo/segmentation.sh).
# Everything not changed here is the real config's: model, memory settings,
# AdamW with lr x10 for neck and head, gradient clipping, the data pipeline.
_base_ = ['../fpn_convneur_m2_80k_ade20k.py']

data_root = '{{$ADE20K_TINY_ROOT:data/ade20k_tiny/}}'

# The tiny images are ~192x256 instead of ADE20K's ~512x680: the paper's resize
# (long side 2048, short side 512) and 512x512 crop, scaled by 1/4.
crop_size = (128, 128)
scale = (512, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# tools/test.py --tta: MMSegmentation's 6 scales x 2 flips, around this test
# scale (the inherited tta_pipeline scales the original image, ADE20K's size)
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=(int(scale[0] * r), int(scale[1] * r)), keep_ratio=True)
         for r in img_ratios],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations', reduce_zero_label=True)],
        [dict(type='PackSegInputs')]]),
]
model = dict(data_preprocessor=dict(size=crop_size))

# Two CPU processes x 4 images (batch 8). No loader workers: the processes
# already use the cores, and tiny images decode in a millisecond.
loader = dict(num_workers=0, persistent_workers=False)
train_dataloader = dict(
    batch_size=4, **loader,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(**loader, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

# Minutes instead of days: a short warm-up and polynomial decay to max_iters.
# lr: the paper's 6e-5 fine-tunes a pretrained backbone over 80k iterations;
# here the backbone starts from scratch and has 80 (6e-5 reaches ~75 mIoU on
# the tiny set, 1e-3 ~87; the x10 for neck and head still applies).
max_iters = 80
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=10),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=10, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
# reproducible demo numbers (the real config leaves the seed random)
randomness = dict(seed=0)
