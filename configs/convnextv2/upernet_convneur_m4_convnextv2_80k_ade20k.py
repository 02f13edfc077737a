# UperNet with ConvNeur-M4, ADE20K, 80k iterations: fine-tuned from an
# ImageNet-trained ConvNeXt-V2-N, whose local network is M4's, with the warm
# start of the global branches (docs/user_guides/warm_start.md).
#
#   python tools/model_converters/convnextv2_to_convneur.py SRC.pth m4_from_cnv2n.pth --arch m4
#   CONVNEUR_PRETRAINED=m4_from_cnv2n.pth \
#       tools/dist_train.sh configs/convnextv2/upernet_convneur_m4_convnextv2_80k_ade20k.py 4
#
# SRC (downloaded by you; nothing downloads at run time): MMPretrain's
# convnext-v2-nano_fcmae-in21k-pre_3rdparty_in1k (or ..._fcmae-pre_3rdparty_in1k),
# timm's convnextv2_nano.fcmae_ft_in22k_in1k (or .fcmae_ft_in1k) or the official
# convnextv2_nano_22k_224_ema.pt.
_base_ = ['../upernet_convneur_m4_80k_ade20k.py']

model = dict(backbone=dict(global_init='warm'))

# The base recipe (AdamW 6e-5, heads at 10x) with layer-wise decay on the
# backbone, as ConvNeXt's UperNet fine-tuning: 0.9 over M4's 16 depths.
optim_wrapper = dict(
    constructor='convneur_mm.LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.9))
