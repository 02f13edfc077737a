"""tools/analysis_tools/get_flops.py prints Table 5 rows in every convention."""
import os
import os.path as osp
import subprocess
import sys

from ..markdown import table_rows
from ..paths import ANALYSIS_TOOLS, REPO

TOOL = osp.join(ANALYSIS_TOOLS, 'get_flops.py')


def _run(*args):
    out = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_rows_of_table5_with_every_convention():
    text = _run('ablations/cls_convneur_m3_nonlocal_300e_in1k.py',
                'ablations/cls_convneur_m3_cbam_300e_in1k.py', '--shape', '224')
    # | row | config | params | paper GFLOPs | ours: paper | paper + matmul | full |
    nonlocal_, cbam = (row for row in table_rows(text) if row[0].startswith('('))
    assert nonlocal_[0] == '(4) Non-local [68]' and nonlocal_[3] == '3.0'
    assert float(nonlocal_[4]) < 1.7 < 2.9 < float(nonlocal_[5]) < 3.0  # matmul counted
    assert cbam[0] == '(3) CBAM [69]' and float(cbam[4]) == float(cbam[5])



def test_other_configs_each_at_their_own_shape_beside_the_rows():
    """A segmentor and a classifier (no Table 5 row): each its backbone and
    whole model at its task's shape (one header at the first's shape, and
    the Table 5 names, labelled them all before); a row config beside them
    still goes to the rows table."""
    text = _run('fpn_convneur_m2_80k_ade20k.py', 'cls_convneur_m4_300e_in1k.py',
                'ablations/cls_convneur_m3_cbam_300e_in1k.py')
    assert 'fpn_convneur_m2_80k_ade20k.py  (' in text and 'input 1x3x512x2048)' in text
    assert 'cls_convneur_m4_300e_in1k.py  (' in text and 'input 1x3x224x224)' in text
    parts = [row[0] for row in table_rows(text)]
    assert parts.count('backbone') == 2 and parts.count('whole') == 2
    rows = [row for row in table_rows(text) if row[0].startswith('(')]
    assert len(rows) == 1 and rows[0][0] == '(3) CBAM [69]'
    assert 'Table 5 rows, whole models, input 1x3x224x224' in text
