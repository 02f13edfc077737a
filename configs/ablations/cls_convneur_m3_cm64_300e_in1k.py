# Table 5, Mem Dim C_m (1): C_m = 64 instead of 128.
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(memory_cfg=dict(dim=64)))
table5 = dict(order=11, experiment='Mem dim C_m', variant='(1)', method='C_m = 64',
              paper_gflops=1.5, paper_top1=78.6)
