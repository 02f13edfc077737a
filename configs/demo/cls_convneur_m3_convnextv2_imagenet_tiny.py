# ConvNeur-M3 on the tiny synthetic ImageNet, with the data and schedule of
# ./cls_convnextv2_pico_imagenet_tiny.py (MMPretrain's ConvNeXt-V2-P config):
# started from a converted ConvNeXt-V2-P classifier with the warm start, or,
# without CONVNEUR_PRETRAINED, from scratch (docs/user_guides/warm_start.md).
#
#   python tools/model_converters/convnextv2_to_convneur.py PICO.pth m3_cls.pth --task cls
#   CONVNEUR_PRETRAINED=m3_cls.pth python tools/train.py \
#       configs/demo/cls_convneur_m3_convnextv2_imagenet_tiny.py
_base_ = ['./cls_convnextv2_pico_imagenet_tiny.py']

pretrained = '{{$CONVNEUR_PRETRAINED:none}}'
_loads = pretrained != 'none'
model = dict(
    backbone=dict(
        _delete_=True,
        type='convneur_mm.ConvNeur',
        arch='m3',
        memory_cfg=dict(chunk_size=196, max_lr=1.0),  # the classification settings
        drop_path_rate=0.1,  # ConvNeXt-V2-P's
        out_indices=(3, ),
        gap_before_final_norm=True,
        global_init='warm',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    # the source's head (the base has none: _delete_ so that the dict may replace it)
    head=dict(init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=pretrained,
                            prefix='head.') if _loads else None))
