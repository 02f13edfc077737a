"""tools/analysis_tools/analyze_model.py: impossible options are usage errors,
and the fast tasks run at tiny sizes (several in one call, with ``--json``).
The documented commands are parsed in tests/test_docs_commands.py."""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ..markdown import table_rows
from ..paths import ANALYSIS_TOOLS, REPO, import_analysis_tool

analyze_model = import_analysis_tool('analyze_model')


@pytest.mark.parametrize('argv,error', [
    (['--tasks', 'flops'], 'needs a CONFIG or --table5'),
    (['--tasks', 'flops', 'erff'], "give tasks out of flops, compilations, "),
    (['--tasks', 'flops', 'a.py', 'erf'], "got ['flops', 'a.py', 'erf']"),
    (['--tasks', 'ops'], 'give tasks out of'),  # the lab's case now (benchmarks.run ops)
    (['--tasks', 'gates', 'cls_convneur_m1_300e_in1k.py'], 'needs --image'),
    (['--tasks', 'compilations'], '--tasks compilations needs a CONFIG'),
    (['--tasks', 'erf', '--checkpoints', 'a.pth'], 'one per --models entry'),
    (['--tasks', 'erf', '--size', '0'], 'must be a positive integer'),
    (['--tasks', 'gates', 'a.py', '--image', 'x.jpg', '--short-side', '0'], 'must be a positive'),
    (['--tasks', 'erf', '--out', 'erf.png'], 'unrecognized arguments: --out'),  # no --out-dir
    (['--tasks', 'erf', '--json', '/nonexistent/x.json'], 'does not exist'),
])
def test_impossible_options_are_usage_errors(argv, error, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analyze_model.parse_args(argv)
    assert exit_info.value.code == 2
    assert error in capsys.readouterr().err


def test_fast_tasks_in_one_call_write_one_json(tmp_path, capsys):
    """flops, erf and gates at tiny sizes; a shared option not given takes
    each task's default."""
    image = tmp_path / 'image.jpg'
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (70, 90, 3),
                                                              dtype=np.uint8))
    out = tmp_path / 'out.json'
    rc = analyze_model.main([
        '--tasks', 'flops', 'erf', 'gates', 'cls_convneur_m1_300e_in1k.py',
        '--shape', '64', '--size', '64', '--num-images', '1',
        '--models', 'ConvNeur-M3 local-only', '--image', str(image),
        '--out-dir', str(tmp_path / 'figures'), '--json', str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if line.startswith('## ')] == [
        '## flops', '## erf', '## gates']
    results = json.loads(out.read_text())
    assert list(results) == ['flops', 'erf', 'gates']
    part = results['flops']['parts']['cls_convneur_m1_300e_in1k.py']
    assert part['shape'] == [64, 64] and 0 < part['backbone']['full'] < part['whole']['full']
    shares = results['erf']['area_shares']['ConvNeur-M3 local-only']
    assert list(shares) == ['0.2', '0.5', '0.9'] and shares['0.2'] < shares['0.9'] <= 1
    assert cv2.imread(results['erf']['figure']) is not None
    gates = results['gates']['cls_convneur_m1_300e_in1k.py']
    assert gates['stages'] == 4 and f'wrote {gates["figure"]} (4 stages)' in text
    panels = cv2.imread(gates['figure'])
    assert panels is not None and panels.shape[1] > panels.shape[0]  # 4 columns x 3 rows


@pytest.mark.parametrize('argv,error', [
    (['--tasks', 'flops', 'gates', 'a.py', '--image', '/nonexistent.png'],
     'argument --image: not found: /nonexistent.png'),
    (['--tasks', 'gates', 'a.py', '--image', __file__, '--checkpoint', 'no.pth'],
     'argument --checkpoint: not found: no.pth'),
    (['--tasks', 'erf', '--models', 'ConvNeur-M3', '--checkpoints', 'no.pth'],
     'argument --checkpoints: not found'),
    (['--tasks', 'erf', '--image-dir', '/nonexistent'], 'argument --image-dir: not found'),
])
def test_a_later_tasks_missing_input_stops_the_run_before_the_first_task(argv, error, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(analyze_model, 'RUNNERS', {})  # no task may run
    assert analyze_model.main(argv) == 2
    assert error in capsys.readouterr().err


def test_a_failing_task_keeps_the_earlier_tasks_results(tmp_path, monkeypatch):
    out = tmp_path / 'out.json'

    def fails(args):
        raise RuntimeError('the second task failed')
    monkeypatch.setitem(analyze_model.RUNNERS, 'erf', fails)
    with pytest.raises(RuntimeError, match='the second task failed'):
        analyze_model.main(['--tasks', 'flops', 'erf', 'cls_convneur_m1_300e_in1k.py',
                            '--shape', '64', '--json', str(out)])
    assert list(json.loads(out.read_text())) == ['flops']


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, osp.join(ANALYSIS_TOOLS, script), *args],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))


def test_table5_rows_with_every_convention():
    out = _run('analyze_model.py', '--tasks', 'flops',
               'ablations/cls_convneur_m3_nonlocal_300e_in1k.py',
               'ablations/cls_convneur_m3_cbam_300e_in1k.py', '--shape', '224')
    assert out.returncode == 0, out.stderr[-2000:]
    # | row | config | params | paper GFLOPs | ours: paper | paper + matmul | full |
    nonlocal_, cbam = (row for row in table_rows(out.stdout) if row[0].startswith('('))
    assert nonlocal_[0] == '(4) Non-local [68]' and nonlocal_[3] == '3.0'
    assert float(nonlocal_[4]) < 1.7 < 2.9 < float(nonlocal_[5]) < 3.0  # matmul counted
    assert cbam[0] == '(3) CBAM [69]' and float(cbam[4]) == float(cbam[5])


@pytest.mark.slow  # the rows' tests cover the tool; these configs' shapes are a variant
def test_other_configs_each_at_their_own_shape_beside_the_rows():
    """A segmentor and a classifier (no Table 5 row): each its backbone and
    whole model at its task's shape; a row config beside them still goes to
    the rows table."""
    out = _run('analyze_model.py', '--tasks', 'flops', 'fpn_convneur_m2_80k_ade20k.py',
               'cls_convneur_m4_300e_in1k.py', 'ablations/cls_convneur_m3_cbam_300e_in1k.py')
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert 'fpn_convneur_m2_80k_ade20k.py  (' in text and 'input 1x3x512x2048)' in text
    assert 'cls_convneur_m4_300e_in1k.py  (' in text and 'input 1x3x224x224)' in text
    parts = [row[0] for row in table_rows(text)]
    assert parts.count('backbone') == 2 and parts.count('whole') == 2
    rows = [row for row in table_rows(text) if row[0].startswith('(')]
    assert len(rows) == 1 and rows[0][0] == '(3) CBAM [69]'
    assert 'Table 5 rows, whole models, input 1x3x224x224' in text


def test_gates_draw_at_the_given_short_side(tmp_path, monkeypatch):
    from convneur_mm.analysis import gate_maps
    calls = []
    monkeypatch.setattr(gate_maps, 'visualize_gates', lambda *args: calls.append(args) or 4)
    argv = ['--tasks', 'gates', 'a.py', '--image', 'x.jpg', '--out-dir', str(tmp_path)]
    analyze_model.gates(analyze_model.parse_args(argv + ['--short-side', '256']))
    analyze_model.gates(analyze_model.parse_args(argv))
    assert [call[-1] for call in calls] == [256, 512]


def test_configs_after_the_tasks_are_configs():
    args = analyze_model.parse_args(['--tasks', 'flops', 'erf', 'a.py', 'b.py', '--top', '3'])
    assert args.tasks == ['flops', 'erf'] and args.configs == ['a.py', 'b.py']
    args = analyze_model.parse_args(['c.py', '--tasks', 'flops', 'a.py'])
    assert args.configs == ['a.py', 'c.py']


@pytest.mark.slow
def test_compilations_task_prints_each_image_and_the_summary(capsys):
    """Two images of the Semantic FPN config: Dynamo's tracing (tens of seconds)."""
    assert analyze_model.main(['--tasks', 'compilations', 'fpn_convneur_m2_80k_ade20k.py',
                               '--num-images', '2']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith('image ') for line in lines) == 2
    assert re.fullmatch(r'2 images, \d distinct input shapes, \d+ graph\(s\) compiled for 3 '
                        r'part\(s\)', lines[-1]), lines[-1]
