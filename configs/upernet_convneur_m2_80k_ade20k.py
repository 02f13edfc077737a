# UperNet with ConvNeur-M2, ADE20K, 80k iterations (not in the paper's Table 4).
# Recipe, data, memory settings and heads as in the M4 UperNet config.
_base_ = ['./upernet_convneur_m4_80k_ade20k.py']

arch, dims = 'm2', [48, 96, 192, 384]
model = dict(
    backbone=dict(arch=arch),
    decode_head=dict(in_channels=dims),
    auxiliary_head=dict(in_channels=dims[2]))
