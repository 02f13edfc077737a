# Table 5, Global Memory (1): local-only, no global branch in any block.
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(memory_placement='none'))
table5 = dict(order=1, experiment='Global memory', variant='(1)', method='Local-only',
              paper_gflops=1.4, paper_top1=78.2)
