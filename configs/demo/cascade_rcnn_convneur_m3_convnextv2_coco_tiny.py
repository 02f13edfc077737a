# The tiny-COCO demo (cascade_rcnn_convneur_m3_coco_tiny.py) started from a
# converted ConvNeXt-V2-P checkpoint with the warm start of the global branches,
# as ../convnextv2/cascade_rcnn_convneur_m3_convnextv2_1x_coco.py does on COCO:
#
#   python tools/model_converters/convnextv2_to_convneur.py SRC.pth m3.pth --arch m3
#   CONVNEUR_PRETRAINED=m3.pth tools/dist_train.sh \
#       configs/demo/cascade_rcnn_convneur_m3_convnextv2_coco_tiny.py 2 --auto-scale-lr
#
# Everything else (data, heads, sampler, schedule) is the tiny demo's.
_base_ = ['./cascade_rcnn_convneur_m3_coco_tiny.py']

model = dict(backbone=dict(global_init='warm'))

# The full config's fine-tuning optimizer: AdamW 2e-4 with layer-wise decay 0.8.
optim_wrapper = dict(
    constructor='convneur_mm.LayerDecayOptimWrapperConstructor',
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    paramwise_cfg=dict(layer_decay_rate=0.8, norm_decay_mult=0.0, bias_decay_mult=0.0,
                       flat_decay_mult=0.0))
