# UperNet with ConvNeur-M3, ADE20K, 80k iterations (not in the paper's Table 4).
# Recipe, data, memory settings and heads as in the M4 UperNet config.
_base_ = ['./upernet_convneur_m4_80k_ade20k.py']

arch, dims = 'm3', [64, 128, 256, 512]
model = dict(
    backbone=dict(arch=arch),
    decode_head=dict(in_channels=dims),
    auxiliary_head=dict(in_channels=dims[2]))
