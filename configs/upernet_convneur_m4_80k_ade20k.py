# UperNet with ConvNeur-M4, ADE20K, 80k iterations (paper Table 4).
# Recipe, data and memory settings as in the Semantic FPN configs; the head is
# MMSegmentation's UperNet (PPM + FPN fusion) with its FCN auxiliary head.
_base_ = ['./fpn_convneur_m3_80k_ade20k.py']

norm_cfg = dict(type='SyncBN', requires_grad=True)
arch, dims = 'm4', [80, 160, 320, 640]
model = dict(
    backbone=dict(arch=arch),
    neck=None,
    decode_head=dict(
        _delete_=True,
        type='UPerHead',
        in_channels=dims,
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=dims[2],
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)))
