# Table 5, Global Branch Type (7): Titans [2] memory as context: our memory, then
# attention within segments of the chunk length (8 heads x 64, 4 persistent tokens).
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(global_mixer='titans'))
table5 = dict(order=8, experiment='Global branch type', variant='(7)', method='Titans [2]',
              paper_gflops=3.1, paper_top1=79.6)
