# Cascade Mask R-CNN + FPN with ConvNeur-M2, COCO 2017, 1x (paper Table 3).
# Same recipe and memory settings as the M3 config.
_base_ = ['./cascade_rcnn_convneur_m3_1x_coco.py']

arch, dims = 'm2', [48, 96, 192, 384]
model = dict(backbone=dict(arch=arch), neck=dict(in_channels=dims))
