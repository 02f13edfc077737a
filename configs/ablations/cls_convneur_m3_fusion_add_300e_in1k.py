# Table 5, Fusion Mechanism (8): addition, X + DropPath(G + F_loc).
_base_ = ['../cls_convneur_m3_300e_in1k.py']

model = dict(backbone=dict(fusion='add'))
table5 = dict(order=9, experiment='Fusion mechanism', variant='(8)', method='Addition',
              paper_gflops=1.8, paper_top1=79.6)
