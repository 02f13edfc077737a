# Table 5, Global Branch Type (4): Non-local [68] (embedded Gaussian, inner width
# C_m / 2) in the bottleneck scaffold at C_m.
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(global_mixer='nonlocal'))
table5 = dict(order=5, experiment='Global branch type', variant='(4)', method='Non-local [68]',
              paper_gflops=3.0, paper_top1=79.1)
