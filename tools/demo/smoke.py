"""Build a detector, a segmentor and a classifier from the shipped configs and
run one forward pass of each on the CPU (seconds; no data needed)."""
import argparse
import time

import torch

import convneur_mm  # noqa: F401
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model, dummy_batch
from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings

CONFIGS = ('cascade_rcnn_convneur_m3_1x_coco.py', 'fpn_convneur_m2_80k_ade20k.py',
           'cls_convneur_m1_300e_in1k.py')


def describe(sample) -> str:
    """The prediction of one data sample, in a few words."""
    if 'pred_instances' in sample:
        return f'{len(sample.pred_instances)} detected instances with masks'
    if 'pred_sem_seg' in sample:
        return f'a {"x".join(map(str, sample.pred_sem_seg.data.shape[-2:]))} label map'
    return f'class {int(sample.pred_label)} (score {float(sample.pred_score.max()):.3f})'


@torch.no_grad()
def main(argv=None):
    argparse.ArgumentParser(description=__doc__).parse_args(argv)  # --help; no options
    silence_known_third_party_warnings()  # the stack's known noise, not ours to act on
    torch.manual_seed(0)
    for name in CONFIGS:
        start = time.perf_counter()
        cfg = load_config(name)
        model = build_model(cfg).eval()
        batch = dummy_batch(model, cfg.default_scope, (320, 480))
        sample = model(batch['inputs'], batch['data_samples'], mode='predict')[0]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f'[smoke] {name}: {type(model).__name__}, {params:.2f}M params, '
              f'predicts {describe(sample)} ({time.perf_counter() - start:.1f}s)')


if __name__ == '__main__':
    main()
