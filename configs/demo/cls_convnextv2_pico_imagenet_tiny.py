# MMPretrain's own ConvNeXt-V2-P config (convnext-v2-pico_32xb32_in1k.py) on the
# tiny synthetic ImageNet (convneur_mm/demo_data/imagenet.py), for MMPretrain's
# tools/train.py: the source network of the warm-start experiment
# (docs/user_guides/warm_start.md). ./cls_convneur_m3_convnextv2_imagenet_tiny.py
# inherits this file and swaps the backbone, so both train on the same data
# with the same schedule. Only what a short CPU run needs changes below.
_base_ = ['mmpretrain::convnext_v2/convnext-v2-pico_32xb32_in1k.py']

# the suite's rule for every config; registers nothing MMPretrain's model uses
custom_imports = dict(imports=['convneur_mm'], allow_failed_imports=False)

data_root = '{{$IMAGENET_TINY_ROOT:data/imagenet_tiny}}'
classes = ('red_disc', 'green_square', 'blue_triangle', 'yellow_ring', 'magenta_cross',
           'cyan_star', 'orange_hexagon', 'white_crescent', 'purple_ellipse', 'brown_frame')
num_classes = len(classes)

# 64x64 crops (the classification demo's), ImageNet's 224/256 test crop ratio
crop, resize = 64, 73
train_pipeline = [dict(p, scale=crop) if p['type'] == 'RandomResizedCrop' else p
                  for p in _base_.train_pipeline]
test_pipeline = [dict(p, scale=resize) if p['type'] == 'ResizeEdge' else
                 dict(p, crop_size=crop) if p['type'] == 'CenterCrop' else p
                 for p in _base_.test_pipeline]

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)

# one process x 32 images (the config's per-GPU batch); no loader workers on 2 cores
train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=50, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline))
test_dataloader = val_dataloader

# 20 epochs of 15 iterations (300). lr: 8e-4 at batch 1024 scales to 2.5e-5 at
# 32, too small to learn from scratch in 300 steps; 1e-3 with a one-epoch
# warm-up learns here. Weight decay 0.3 as configured.
max_epochs = 20
optim_wrapper = dict(optimizer=dict(lr=1e-3))
auto_scale_lr = dict(base_batch_size=32)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
# no EMA: at momentum 1e-4 per step, 300 steps leave the average at the init
custom_hooks = [dict(type='convneur_mm.NonFiniteStopHook')]
default_hooks = dict(logger=dict(interval=5),
                     checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
randomness = dict(seed=0)
