# Table 5, Global Branch Type (3): CBAM [69] in the bottleneck scaffold at C_m.
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(global_mixer='cbam'))
table5 = dict(order=4, experiment='Global branch type', variant='(3)', method='CBAM [69]',
              paper_gflops=1.5, paper_top1=78.4)
