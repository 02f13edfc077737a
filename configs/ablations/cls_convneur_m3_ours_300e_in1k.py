# Table 5 default row (per-stage memory, gated fusion, C_m = 128): ConvNeur-M3
# exactly as configs/cls_convneur_m3_300e_in1k.py; listed here so that the
# ablation run has every row of the table in one folder.
_base_ = ['../cls_convneur_m3_300e_in1k.py']

table5 = dict(order=2, experiment='Global memory / branch type / fusion / C_m', variant='-',
              method='Ours (per-stage memory, gate, C_m = 128)', paper_gflops=1.8,
              paper_top1=80.0)
