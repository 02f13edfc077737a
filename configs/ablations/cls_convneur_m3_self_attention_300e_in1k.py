# Table 5, Global Branch Type (5): global self-attention [63] in the bottleneck
# scaffold at C_m (one head, as the memory).
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(global_mixer='attention'))
table5 = dict(order=6, experiment='Global branch type', variant='(5)',
              method='Self attention [63]', paper_gflops=1.8, paper_top1=79.8)
