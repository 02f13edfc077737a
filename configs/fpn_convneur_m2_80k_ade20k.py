# Semantic FPN with ConvNeur-M2, ADE20K, 80k iterations (paper Table 4).
_base_ = ['./fpn_convneur_m3_80k_ade20k.py']

arch, dims = 'm2', [48, 96, 192, 384]
model = dict(backbone=dict(arch=arch), neck=dict(in_channels=dims))
