# Table 5, Fusion Mechanism (9): concatenation, X + DropPath(Conv1x1([G, F_loc])).
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(fusion='concat'))
table5 = dict(order=10, experiment='Fusion mechanism', variant='(9)', method='Concatenate',
              paper_gflops=1.9, paper_top1=79.5)
