# ConvNeur-M3 on ImageNet-1K, fine-tuned for 30 epochs from ConvNeXt-V2-P
# (FCMAE, then ImageNet-1K; 80.3 top-1), whose local network is M3's, with the
# warm start of the global branches: at step 0 the classifier is ConvNeXt-V2-P
# (docs/user_guides/warm_start.md). The whole classifier, head included, is
# loaded from the converted checkpoint.
#
#   python tools/model_converters/convnextv2_to_convneur.py SRC.pth m3_cls.pth --arch m3 --task cls
#   CONVNEUR_PRETRAINED=m3_cls.pth tools/dist_train.sh configs/convnextv2/cls_convneur_m3_convnextv2_ft_in1k.py 8
#
# SRC (downloaded by you; nothing downloads at run time): MMPretrain's
# convnext-v2-pico_fcmae-pre_3rdparty_in1k, timm's convnextv2_pico.fcmae_ft_in1k
# or the official convnextv2_pico_1k_224_ema.pt. A checkpoint without a head
# (MMPretrain's convnext-v2-pico_3rdparty-fcmae_in1k) needs the 300-epoch
# recipe's head init instead: set model.head.init_cfg=None.
_base_ = ['../cls_convneur_m3_300e_in1k.py']

pretrained = '{{$CONVNEUR_PRETRAINED:none}}'
_loads = pretrained != 'none'
model = dict(
    backbone=dict(
        global_init='warm',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    # the source's ImageNet head; without a checkpoint the recipe's own init
    head=dict(init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=pretrained,
                            prefix='head.') if _loads else
              dict(type='TruncNormal', layer='Linear', std=.02, bias=0.)))

# Fine-tuning, not training: 30 epochs, lr 1e-4 at batch 4096-equivalent with
# layer-wise decay 0.9 over M3's 14 depths, 2 warm-up epochs.
max_epochs = 30
optim_wrapper = dict(
    constructor='convneur_mm.LayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=1e-4),
    paramwise_cfg=dict(layer_decay_rate=0.9))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=2, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=2,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs)
