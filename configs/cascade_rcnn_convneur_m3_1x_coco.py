# Cascade Mask R-CNN + FPN with ConvNeur-M3, COCO 2017, 1x schedule (paper Table 3).
# The paper's recipe: 4 GPUs x 2 images (batch 8), SGD lr 0.02, momentum 0.9,
# weight decay 1e-4, 12 epochs, 500-iteration linear warm-up, steps at epochs 8
# and 11 (gamma 0.1), single-scale 1333x800 for training and testing, no TTA.
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

# Read anywhere (MMEngine's inferencers load the weights before they build the
# model), this config imports convneur_mm: the backbone's registration and the
# checkpoint allow-list that lets torch's weights-only load read our checkpoints.
custom_imports = dict(imports=['convneur_mm'], allow_failed_imports=False)

# ---- per-task memory settings (paper Sec. 4.2) --------------------------------
# Higher resolution: larger chunks (4096 tokens) and a small inner step size
# (1e-3) so that sparse box/mask supervision does not cause frequent writes.
memory_cfg = dict(chunk_size=4096, max_lr=1e-3)

# ---- paths, all overridable without editing this file -------------------------
# ImageNet-pretrained backbone (tools/model_converters/cls_to_backbone.py):
#   CONVNEUR_PRETRAINED=path/to/convneur_m3_backbone.pth, or --cfg-options
#   model.backbone.init_cfg.checkpoint=PATH. "none": train from scratch (warns).
pretrained = '{{$CONVNEUR_PRETRAINED:none}}'
data_root = '{{$COCO_ROOT:data/coco/}}'

arch, dims = 'm3', [64, 128, 256, 512]
model = dict(
    backbone=dict(
        _delete_=True,
        type='convneur_mm.ConvNeur',
        arch=arch,
        memory_cfg=memory_cfg,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        gap_before_final_norm=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=dims))

train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))  # x 4 GPUs
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
# rstrip: COCO_ROOT given with or without its trailing slash
val_evaluator = dict(ann_file=data_root.rstrip('/') + '/annotations/instances_val2017.json')
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4))
# lr 0.02 is the paper's for a total batch of 8; --auto-scale-lr rescales it.
auto_scale_lr = dict(enable=False, base_batch_size=8)

# Stop at the first non-finite loss or gradient, naming the iteration, the loss
# terms and the module group (docs/user_guides/train_and_test.md#non-finite-training).
custom_hooks = [dict(type='convneur_mm.NonFiniteStopHook')]
