"""tools/demo/check_band.py: a demo outside its acceptance band, or with no
metrics at all (a training that went NaN leaves an empty COCO table), fails."""
import os.path as osp
import re

import pytest

from convneur_mm.apis.reporting import format_metrics
from ..paths import REPO, import_file

check_band = import_file('convneur_check_band', osp.join(REPO, 'tools', 'demo', 'check_band.py'))


def _coco_log(box: float, mask: float) -> str:
    metrics = {f'coco/{task}_{col}': value
               for task, ap in (('bbox', box), ('segm', mask))
               for col, value in zip(('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l'),
                                     (ap, 0.9, 0.9, -1, 0.8, 0.9))}
    return 'training noise\n| not | a metric |\n' + format_metrics(metrics, 'det.py @ epoch_8.pth')


def test_reads_the_last_section_coco_rows_and_plain_metrics():
    earlier = format_metrics({'mIoU': 10.0}, 'old.py @ iter_1.pth')
    text = earlier + '\n' + format_metrics({'mIoU': 88.66, 'aAcc': 96.75, 'mAcc': 92.56},
                                           'seg.py @ iter_80.pth')
    assert check_band.read_metrics(text) == {'mIoU': 88.66, 'aAcc': 96.75, 'mAcc': 92.56}
    coco = check_band.read_metrics(_coco_log(0.872, 0.915))
    assert coco['bbox AP'] == 87.2 and coco['segm AP'] == 91.5 and 'bbox APs' not in coco


@pytest.mark.parametrize('box,mask,fails', [(0.872, 0.915, []), (0.5, 0.915, ['bbox AP 50'])])
def test_band_check(tmp_path, box, mask, fails):
    log = tmp_path / 'test.log'
    log.write_text(_coco_log(box, mask))
    assert check_band.main(['detection', str(log)]) == (1 if fails else 0)
    found = check_band.problems('detection', check_band.read_metrics(log.read_text()))
    assert [p.split(' is outside')[0] for p in found] == fails


def test_an_empty_evaluation_fails(tmp_path, capsys):
    log = tmp_path / 'test.log'
    log.write_text('## det.py @ epoch_8.pth\nThe testing results of the whole dataset is empty.\n')
    assert check_band.main(['detection', str(log)]) == 1
    assert 'bbox AP: not in the evaluation output' in capsys.readouterr().err


def test_the_bands_are_the_manuals():
    """docs/user_guides/demos.md's band table says what BANDS holds."""
    with open(osp.join(REPO, 'docs', 'user_guides', 'demos.md'), encoding='utf-8') as f:
        table = f.read().split('## Acceptance bands')[1]
    rows = [line for line in table.splitlines()
            if re.match(r'\| (classification|segmentation|detection)', line)]
    documented = {}
    for row in rows:
        demo, band = [c.strip() for c in row.strip().strip('|').split('|')]
        documented[demo.split()[0]] = {
            name: (float(low), float(high))
            for name, low, high in re.findall(r'([\w -]+?) (\d+)-(\d+)', band.replace(',', ''))}
    names = {'top-1': 'accuracy/top1', 'top-5': 'accuracy/top5', 'box AP': 'bbox AP',
             'mask AP': 'segm AP'}
    wanted = {demo: {names.get(n.strip(), n.strip()): b for n, b in bands.items()}
              for demo, bands in documented.items()}
    assert wanted == check_band.BANDS
