# The recipe of the Table 5 ablation run on the embedded tiny ImageNet
# (tools/analysis_tools/analyze_model.py --tasks ablation-table), bounded so
# that all 12 rows train and evaluate in about half an hour on an idle 2-core
# CPU: a smoke test that every row learns, under one recipe and seed, not a
# reproduction of the paper's ImageNet accuracies. Every row takes its backbone from its own config (the
# full-size ConvNeur-M3 with the row's switch) and everything else from here.
# Starts from the classification demo (configs/demo/cls_convneur_m1_imagenet_tiny.py:
# 64x64 crops, AdamW, warm-up + cosine, label smoothing); each change says why.
_base_ = ['../../demo/cls_convneur_m1_imagenet_tiny.py']

# Light augmentation: random-resized crop and flip only. RandAugment, Random
# Erasing, Mixup and CutMix regularize 300 epochs; in a few epochs they slow
# learning (docs/notes/benchmarks.md#table-5-rows-on-the-tiny-imagenet-machine-c).
train_pipeline = [p for p in _base_.train_pipeline
                  if p['type'] not in ('RandAugment', 'RandomErasing')]
model = dict(train_cfg=dict(_delete_=True))
data_preprocessor = dict(num_classes=10, to_onehot=False)

# One process of 32 images (tools/dist_train.sh CONFIG 1): 15 steps per epoch
# on the 480 training images; a second process would start the toolboxes twice
# on the same two cores.
train_dataloader = dict(batch_size=32, dataset=dict(pipeline=train_pipeline))
auto_scale_lr = dict(base_batch_size=32)
# lr: the demo's 2e-3 lets M1 learn; M3 is 1.6x wider (the step scaled by the
# width ratio, as for wider transformers)
optim_wrapper = dict(optimizer=dict(lr=1e-3))

# 4 epochs (60 steps): warm-up over the first half epoch, cosine to the end; the
# 12 rows train in about half an hour of CPU time
# (docs/notes/benchmarks.md#table-5-rows-on-the-tiny-imagenet-machine-c)
max_epochs = 4
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-2, by_epoch=True, end=0.5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=0.5,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
default_hooks = dict(logger=dict(interval=5),
                     checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))

# no stochastic depth in so short a run (the same for every row)
backbone_overrides = dict(drop_path_rate=0.0)
