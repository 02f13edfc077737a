# Table 5, Global Branch Type (6): IR-RWKV [39] (RWKV-UNet's inverted-residual
# block around a Vision-RWKV spatial mix; expansion 1, 5x5 depthwise conv).
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(global_mixer='rwkv'))
table5 = dict(order=7, experiment='Global branch type', variant='(6)', method='IR-RWKV [39]',
              paper_gflops=2.0, paper_top1=77.6)
