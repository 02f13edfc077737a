"""``python -m benchmarks.run table5`` (benchmarks/paper/table5.py): a row
trained end to end under a shrunken recipe, its cache, time bound and exit
codes, and the report; its dry run."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from benchmarks.paper import table5 as ablation_table
from convneur_mm.demo_data.imagenet import generate_imagenet_tiny
from tests.markdown import table_rows
from tests.paths import REPO

ROW = osp.join(REPO, 'configs', 'ablations', 'cls_convneur_m3_local_only_300e_in1k.py')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Two images per class and a two-epoch version of the demo recipe."""
    root = tmp_path_factory.mktemp('ablation')
    generate_imagenet_tiny(str(root / 'data'), train_per_class=2, val_per_class=1)
    recipe = root / 'recipe.py'
    demo = osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py')
    recipe.write_text(f"_base_ = ['{demo}']\n"
                      'train_dataloader = dict(batch_size=10)\n'
                      'train_cfg = dict(max_epochs=2, val_interval=1)\n'
                      'default_hooks = dict(logger=dict(interval=1), '
                      'checkpoint=dict(interval=2))\n')
    return root


def _run(tiny, work_dir, *args):
    cmd = [sys.executable, '-m', 'benchmarks.run', 'table5', ROW, '--recipe',
           str(tiny / 'recipe.py'), '--data-root', str(tiny / 'data'), '--gpus', '1',
           '--work-dir', str(work_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.slow
def test_trains_a_row_prints_its_line_and_reuses_the_result(tiny, tmp_path):
    out = _run(tiny, tmp_path, '--skip-speed')
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'epoch 2/2' in out.stdout  # progress
    cells = list(next(row for row in table_rows(out.stdout) if 'Local-only' in row))
    assert cells[3:6] == ['1.38', '1.38', '1.37']  # MACs of the trained model at 224
    assert 0 <= float(cells[10]) <= 100 and cells[12] == '1.4, 78.2'
    assert 'smoke test of learning' in out.stdout
    for name in ('table.md', 'results.json', 'accuracy_vs_gflops.png'):
        assert osp.getsize(tmp_path / name) > 0
    # a second run reads the cached run instead of training again, and times the row
    again = _run(tiny, tmp_path, '--speed-only', '--speed-shape', '64', '--speed-batch', '2')
    assert again.returncode == 0, again.stderr[-3000:]
    assert '] training' not in again.stdout
    assert next(row for row in table_rows(again.stdout) if 'Local-only' in row)[10] == cells[10]
    speed = json.loads((tmp_path / 'results.json').read_text())['rows'][0]['speed']
    assert speed['throughput'] > 0 and speed['shape'] == 64


@pytest.mark.slow
def test_a_run_out_of_time_is_stopped_and_fails_the_tool(tiny, tmp_path):
    out = _run(tiny, tmp_path, '--skip-speed', '--row-minutes', '0.05')
    assert out.returncode == 1
    assert 'timeout' in out.stdout and 'incomplete rows' in out.stderr
    result = json.loads((tmp_path / 'results.json').read_text())['rows'][0]['runs'][0]
    assert result['status'] == 'timeout' and result['wall_s'] < 30
    again = _run(tiny, tmp_path, '--skip-speed', '--row-minutes', '0.05')
    assert '] training' in again.stdout  # a run that did not finish is not reused


def test_cached_results_belong_to_one_row_recipe_and_data(tiny, tmp_path):
    """A result is reused only for the same merged config: another recipe or
    data root gives the row another key (a rerun into the same work dir with
    another recipe printed the old accuracies under the new recipe's name)."""
    from convneur_mm.apis.launch import load_config
    recipe = load_config(str(tiny / 'recipe.py'))
    other = load_config(str(tiny / 'recipe.py'))
    other.train_cfg.max_epochs = 3
    key = ablation_table.Row(ROW, recipe, str(tiny / 'data'), str(tmp_path)).key
    assert ablation_table.Row(ROW, recipe, str(tiny / 'data'), str(tmp_path)).key == key
    assert ablation_table.Row(ROW, other, str(tiny / 'data'), str(tmp_path)).key != key
    assert ablation_table.Row(ROW, recipe, str(tmp_path), str(tmp_path)).key != key
    ok = dict(status='ok', key=key, gpus=1)
    assert ablation_table._matches(ok, status='ok', key=key, gpus=1)
    assert not ablation_table._matches(dict(ok, key='other'), status='ok', key=key, gpus=1)
    assert not ablation_table._matches(dict(ok, status='timeout'), status='ok', key=key, gpus=1)
    assert not ablation_table._matches(None, status='ok')


def test_last_validation_and_epoch_time_from_scalars(tmp_path):
    vis = tmp_path / '20260101_000000' / 'vis_data'
    vis.mkdir(parents=True)
    entries = [dict(loss=2.0, time=0.5, epoch=1, iter=4, step=4),
               {'accuracy/top1': 30.0, 'accuracy/top5': 70.0, 'step': 1},
               dict(loss=1.0, time=0.7, epoch=2, iter=8, step=8),
               {'accuracy/top1': 60.0, 'step': 2}]
    (vis / 'scalars.json').write_text('\n'.join(json.dumps(e) for e in entries))
    result = ablation_table.last_validation(str(tmp_path))
    assert result == dict(top1=60.0, top5=None, seconds_per_epoch=0.6 * 4, final_loss=1.0)


def test_table_gives_mean_and_spread_over_seeds_and_names_failures():
    cost = dict(params=1e7, paper=1.7e9, paper_matmul=1.7e9, full=3.4e9)
    meta = dict(variant='-', method='Ours', paper_gflops=1.8, paper_top1=80.0)
    runs = [dict(seed=0, status='ok', top1=60.0, top5=90.0, wall_s=120, cpu_s=180),
            dict(seed=1, status='ok', top1=70.0, top5=100.0, wall_s=120, cpu_s=180),
            dict(seed=2, status='timeout', wall_s=600)]
    rows = ablation_table.summarize([dict(meta=meta, cost=cost, runs=runs, speed=None)])
    text = ablation_table.table(rows)
    # minutes per row: wall and CPU of the finished runs
    assert table_rows(text)[1][-4:] == ('65.0 ± 7.1 (seed 2: timeout)', '95.0 ± 7.1',
                                        '1.8, 80.0', '2.0 / 3.0')


def test_child_wrapper_keeps_the_exit_code():
    out = subprocess.run([sys.executable, '-c', ablation_table.CHILD_CODE, sys.executable, '-c',
                          'import sys; sys.exit(3)'], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 3
    report = json.loads(out.stdout.split('ABLATION_CHILD_RESULT ')[1])
    assert report['rc'] == 3 and report['maxrss_mb'] > 0 and report['cpu_s'] > 0


def test_missing_data_is_generated_with_the_recipes_arguments(tmp_path):
    """A recipe's ``data_generator_args`` reach its generator (the order
    probe's recipe needs them: its data are not the generator's default)."""
    from mmengine.config import Config
    recipe = Config(dict(data_generator_args=[
        '--relation', 'above', '--distractors', '0', '--kinds', '2', '--size', '48',
        '--train-per-class', '1', '--val-per-class', '1']))
    root = str(tmp_path / 'probe')
    ablation_table.ensure_data(recipe, root, 'projects.global_probe.probe.data')
    with open(osp.join(root, 'meta', 'classes.txt')) as f:
        assert f.read().split() == ['red_below', 'red_above']
    os.remove(osp.join(root, 'train', 'red_above', 'red_above_0001.JPEG'))
    ablation_table.ensure_data(recipe, root, 'projects.global_probe.probe.data')  # present: kept
    assert not osp.exists(osp.join(root, 'train', 'red_above', 'red_above_0001.JPEG'))
