# Cascade Mask R-CNN + FPN with ConvNeur-M3, COCO 2017, 1x: fine-tuned from an
# ImageNet-trained ConvNeXt-V2-P, whose local network is M3's, with the warm
# start of the global branches (docs/user_guides/warm_start.md).
#
#   python tools/model_converters/convnextv2_to_convneur.py SRC.pth m3_from_cnv2p.pth --arch m3
#   CONVNEUR_PRETRAINED=m3_from_cnv2p.pth \
#       tools/dist_train.sh configs/convnextv2/cascade_rcnn_convneur_m3_convnextv2_1x_coco.py 4
#
# SRC (downloaded by you; nothing downloads at run time): MMPretrain's
# convnext-v2-pico_fcmae-pre_3rdparty_in1k, timm's convnextv2_pico.fcmae_ft_in1k
# (model.safetensors) or the official convnextv2_pico_1k_224_ema.pt.
_base_ = ['../cascade_rcnn_convneur_m3_1x_coco.py']

# G = 0 and pwconv2 x2 in the gated blocks after the load: ConvNeXt-V2's function at step 0
model = dict(backbone=dict(global_init='warm'))

# Fine-tuning a pretrained ConvNeXt for detection (ConvNeXt's recipe): AdamW with
# layer-wise lr decay, the early layers moving least; decay 0.8 over M3's 14
# depths (stem, 12 blocks, output) scales the stem's lr by 0.8 ** 13 = 0.055.
optim_wrapper = dict(
    constructor='convneur_mm.LayerDecayOptimWrapperConstructor',
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    paramwise_cfg=dict(layer_decay_rate=0.8, norm_decay_mult=0.0, bias_decay_mult=0.0,
                       flat_decay_mult=0.0))
