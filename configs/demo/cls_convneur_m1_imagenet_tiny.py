# ConvNeur-M1 on the tiny synthetic ImageNet (convneur_mm/demo_data/imagenet.py):
# the real M1 recipe - model, AdamW, warm-up + cosine, RandAugment, Mixup, CutMix,
# Random Erasing, label smoothing, memory chunk 196 / inner step 1 - shrunk to a
# run that learns in about 3 minutes on 2 CPU cores (tools/demo/classification.sh).
# Only what must change for that changes below; each change says why.
_base_ = ['../cls_convneur_m1_300e_in1k.py']

# data root: the generator's default output; override with $IMAGENET_TINY_ROOT
data_root = '{{$IMAGENET_TINY_ROOT:data/imagenet_tiny}}'
# the generator's classes (its CLASSES; meta/classes.txt): names for the
# checkpoint's dataset_meta instead of ImageNet's 1000
classes = ('red_disc', 'green_square', 'blue_triangle', 'yellow_ring', 'magenta_cross',
           'cyan_star', 'orange_hexagon', 'white_crescent', 'purple_ellipse', 'brown_frame')
num_classes = len(classes)

# 64x64 crops instead of 224 (as in downsampled ImageNet 64x64): a twelfth of the
# pixels, so that a CPU core trains M1 in minutes; the first stage still has 16x16 = 256 tokens, i.e.
# two memory chunks of 196. The ops and magnitudes are the base pipelines', unchanged;
# the test resize keeps ImageNet's 224/256 crop ratio.
crop, resize = 64, 73
train_pipeline = [dict(p, scale=crop) if p['type'] == 'RandomResizedCrop' else p
                  for p in _base_.train_pipeline]
test_pipeline = [dict(p, scale=resize) if p['type'] == 'ResizeEdge' else
                 dict(p, crop_size=crop) if p['type'] == 'CenterCrop' else p
                 for p in _base_.test_pipeline]

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)  # one-hot targets for Mixup/CutMix

# 2 processes x 32 images = global batch 64 (tools/dist_train.sh CONFIG 2);
# workers would compete with the training processes for the 2 cores.
train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=50, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline))
test_dataloader = val_dataloader

# lr: the linear scaling rule would give 4e-3 * 64 / 4096 = 6.25e-5, right for
# 300 epochs but far too small to learn anything in 16; a short run from scratch
# at batch 64 needs a larger step (4e-3 collapses to chance here, 2e-3 learns).
# base_batch_size is this run's batch, so that --auto-scale-lr keeps the lr per
# image when the demo runs with another process count.
optim_wrapper = dict(optimizer=dict(lr=2e-3), accumulative_counts=1)  # one process, no accumulation
auto_scale_lr = dict(base_batch_size=64)

# 16 epochs (128 iterations) with the paper's warm-up share (20 of 300 epochs
# -> 1 of 16); the cosine decay to 1e-6 still ends at max_epochs.
max_epochs = 16
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=1,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=4)

# log every few iterations and keep only the final checkpoint
default_hooks = dict(
    logger=dict(interval=4),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
randomness = dict(seed=0)  # a reproducible demo
