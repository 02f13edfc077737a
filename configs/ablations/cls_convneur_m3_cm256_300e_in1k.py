# Table 5, Mem Dim C_m (2): C_m = 256 instead of 128.
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(memory_cfg=dict(dim=256)))
table5 = dict(order=12, experiment='Mem dim C_m', variant='(2)', method='C_m = 256',
              paper_gflops=2.7, paper_top1=80.3)
