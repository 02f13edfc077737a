# Table 5, Global Memory (2): the memory in every block instead of once per stage.
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(memory_placement='block'))
table5 = dict(order=3, experiment='Global memory', variant='(2)', method='Per-layer',
              paper_gflops=2.3, paper_top1=80.4)
