"""The seeds case: its commands per variant, the parsing of a run's output
(healthy, NaN, stopped by NonFiniteStopHook), the table and its exit code,
the running means undone and the gradient-norm figure, the dry run, and one
real diverging run (slow)."""
import json
import math
import os
import random

import pytest
import torch
from mmengine.config import ConfigDict

from benchmarks import run
from benchmarks.common.record import Record
from benchmarks.training import seeds as sd
from tests.threads import one_thread

DETECTION = sd.DEMOS['detection']
NO_RECORD = Record(None, 'seeds')


def _line(epoch, it, per_epoch, loss, extra=''):
    """A rank-0 line of MMEngine's epoch-based training log."""
    return (f'11/28 10:00:23 - mmengine - INFO - Epoch(train) [{epoch}][{it:2d}/{per_epoch}]  '
            f'lr: 1.0000e-02  eta: 0:02:58  time: 2.5071  data_time: 0.0080  '
            f'grad_norm.neck: 13.7242{extra}  loss: {loss}  loss_rpn_cls: 0.7100  '
            f's0.loss_cls: {loss}  s0.acc: 6.2500')


HEALTHY = '\n'.join([_line(1, 1, 2, '6.1059'), _line(1, 2, 2, '5.5000'),
                     _line(2, 1, 2, '4.9000'), _line(2, 2, 2, '4.0951'), 'rc=0'])
# a run without the hook: the logged loss turns NaN and stays NaN
NAN = '\n'.join([_line(1, 1, 2, '3.9541'), _line(1, 2, 2, '3.8936'),
                 _line(2, 1, 2, '2.1e+11'), _line(2, 2, 2, 'nan'), _line(3, 1, 2, 'nan'),
                 _line(3, 2, 2, 'nan')])
STOP_MESSAGE = ("non-finite training at iteration 4 (epoch 2): loss terms s0.loss_cls=nan, "
                "loss_rpn_bbox=[0.1, nan]; first non-finite gradient in group "
                "'backbone.stage1.global' (parameter backbone.stages.0.0.global_branch.w); "
                "non-finite in 3 of 12 groups: backbone.stage1.global, neck, roi_head")
STOPPED = '\n'.join([
    _line(1, 1, 2, '6.1059'), _line(1, 2, 2, '5.4000'), _line(2, 1, 2, '233.0122'),
    '[rank0]: Traceback (most recent call last):',
    '[rank0]:   File "tools/train.py", line 84, in <module>',
    f'[rank0]: convneur_mm.engine.finite_check.NonFiniteTrainingError: {STOP_MESSAGE}',
    f'[rank1]: convneur_mm.engine.finite_check.NonFiniteTrainingError: {STOP_MESSAGE}',
    'torch.distributed.elastic.multiprocessing.errors.ChildFailedError:'])


def test_a_healthy_run_gives_each_epochs_last_loss_and_nothing_non_finite():
    log = sd.parse_log(HEALTHY)
    assert log.losses == [5.5, 4.0951] and log.marks == [2, 4] and log.last_iteration == 4
    assert log.first_nonfinite is None and log.stop_message is None and log.stop_group is None


def test_a_nan_run_names_its_first_non_finite_iteration():
    log = sd.parse_log(NAN)
    assert log.losses[0] == 3.8936 and all(math.isnan(v) for v in log.losses[1:])
    assert log.first_nonfinite == 4 and log.last_iteration == 6  # 2.1e11 is finite
    assert log.stop_message is None


def test_a_run_stopped_by_the_hook_gives_its_message_and_group():
    log = sd.parse_log(STOPPED)
    assert log.losses == [5.4] and log.last_iteration == 3 and log.first_nonfinite == 4
    assert log.stop_message == STOP_MESSAGE and log.stop_group == 'backbone.stage1.global'


def test_a_stop_in_the_loss_check_has_no_group():
    text = ('[rank0]: convneur_mm.engine.finite_check.NonFiniteTrainingError: non-finite '
            'training at iteration 7 (epoch 1): a loss term on another rank; no checkpoint '
            'is written after it')
    log = sd.parse_log(text)
    assert log.first_nonfinite == 7 and log.stop_group is None and log.losses == []


def test_an_iteration_based_run_reports_every_so_many_iterations():
    lines = [f'mmengine - INFO - Iter(train) [{i:2d}/40]  lr: 1e-03  loss: {5 - i / 10:.4f}  '
             f'decode.loss_ce: 1.0' for i in range(1, 41)]
    log = sd.parse_log('\n'.join(lines), report_every=20)
    assert log.marks == [20, 40] and log.losses == [3.0, 1.0] and log.last_iteration == 40


@pytest.mark.parametrize('variant,own', [
    ('autograd', ['model.backbone.memory_cfg.backward=autograd']),
    ('closed_form', ['model.backbone.memory_cfg.backward=closed_form']),
    ('local', ['model.backbone.memory_placement=none']),
])
def test_each_variants_command_line(variant, own):
    options = sd.run_options(DETECTION, variant, 7, 3)
    command = sd.run_command(DETECTION, 'runs/x_s7', options)
    assert command[0].endswith('tools/dist_train.sh')
    assert command[1].endswith('configs/demo/cascade_rcnn_convneur_m3_coco_tiny.py')
    assert command[2:7] == ['2', '--work-dir', 'runs/x_s7', '--auto-scale-lr', '--cfg-options']
    assert command[7:] == ['train_cfg.max_epochs=3', 'randomness.seed=7',
                           'default_hooks.logger.interval=1',
                           'custom_hooks.0.log_group_norms=True',
                           'default_hooks.checkpoint=None'] + own


def test_no_clip_checkpoints_extra_options_and_an_iteration_based_demo():
    options = sd.run_options(DETECTION, 'local', 0, 1, clip=False, extra=['a.b=1'],
                             checkpoint=True)
    assert sd.NO_CLIP in options and sd.NO_CHECKPOINT not in options
    assert options[-2:] == ['model.backbone.memory_placement=none', 'a.b=1']
    segmentation = sd.DEMOS['segmentation']
    assert sd.run_options(segmentation, 'autograd', 0, 40)[0] == 'train_cfg.max_iters=40'
    assert '--auto-scale-lr' not in sd.run_command(segmentation, 'w', [])
    with pytest.raises(ValueError, match='variant must be one of'):
        sd.run_options(DETECTION, 'nosuch', 0, 3)


def _entry(variant, seed, text, status):
    return dict(sd.parse_log(text)._asdict(), variant=variant, seed=seed, exit_status=status,
                seconds=1.0, command='c', work_dir='w')


def _result(runs, variants=('autograd', 'local'), seeds=(0, 1), dry=False):
    return dict(demo='detection', config=DETECTION.config, length=2, unit='epoch',
                report_every=0, processes=2, clip=False, extra=[], seeds=list(seeds),
                variants=list(variants), dry=dry, runs=runs)


def test_the_table_has_a_row_per_seed_and_a_column_per_variant():
    runs = [_entry('autograd', 0, HEALTHY, 0), _entry('local', 0, STOPPED, 1),
            _entry('autograd', 1, NAN, 0), _entry('local', 1, HEALTHY, 1)]
    report = sd.format_report(_result(runs))
    assert '| seed | autograd | local |' in report and 'no gradient clipping' in report
    assert '| 0 | 5.5, 4.1 | 5.4; non-finite at 4 in backbone.stage1.global |' in report
    assert '| 1 | 3.89, NaN, NaN; non-finite at 4, NOT stopped | 5.5, 4.1; failed (exit 1) |' \
        in report
    assert 'autograd: 1 trained, 1 unstopped of 2 runs' in report
    assert 'local: 1 stopped, 1 failed of 2 runs' in report


def test_a_missing_or_untrained_run_has_its_own_cell():
    assert sd.run_cell(None) == '-'
    assert sd.run_cell(dict(variant='local', seed=0, command='c')) == 'not trained'
    assert sd._format_loss(2.1e11) == '2.1e11' and sd._format_loss(566.2) == '566'


def test_the_record_is_written_after_every_run_and_failures_are_exit_1(tmp_path, monkeypatch,
                                                                      capsys):
    outputs = iter([(HEALTHY, 0), (STOPPED, 1), (NAN, 0), (HEALTHY, 0)])
    written = []

    def fake_train_one(command, log_path, env, report_every=0):
        text, status = next(outputs)
        assert env[DETECTION.data_variable] == str(tmp_path / 'data')
        return dict(sd.parse_log(text)._asdict(), exit_status=status, seconds=1.0)

    monkeypatch.setattr(sd, 'train_one', fake_train_one)
    monkeypatch.setattr(sd, 'check_options',
                        lambda demo, options: ConfigDict(train_cfg=dict(max_epochs=2)))
    monkeypatch.setenv(DETECTION.data_variable, str(tmp_path / 'data'))
    (tmp_path / 'data' / 'annotations').mkdir(parents=True)
    (tmp_path / 'data' / DETECTION.data_marker).write_text('{}')
    record = Record(str(tmp_path / 'seeds.json'), 'seeds')
    record.write = lambda result: written.append(len(result['runs']))
    args = run.parse_args(['seeds', '--seeds', '0', '1', '--variants', 'autograd', 'local',
                           '--length', '2', '--work-dir', str(tmp_path / 'runs')])
    result = sd.run_from_args(args, record)
    assert written == [1, 2, 3, 4] and result['exit_code'] == 1  # seed 1 autograd: unstopped
    assert [sd.run_verdict(r) for r in result['runs']] == ['trained', 'stopped', 'unstopped',
                                                           'trained']
    assert result['runs'][1]['work_dir'].endswith('local_s0')
    assert 'local seed 0: 5.4; non-finite at 4' in capsys.readouterr().err


def test_running_means_are_undone():
    rng = random.Random(0)
    values = [rng.uniform(0.1, 10) for _ in range(30)] + [1e6, 2e7]
    for window in (1, 3, 50):
        means = [sum(values[max(0, k + 1 - window):k + 1]) / min(k + 1, window)
                 for k in range(len(values))]
        assert sd.per_iteration(means, window) == pytest.approx(values, rel=1e-9, abs=1e-9)
    with pytest.raises(ValueError, match='not running means over 2'):
        sd.per_iteration([10.0, 1.0], 2)  # the second value would be -8
    with pytest.raises(ValueError, match='window must be >= 1'):
        sd.per_iteration([1.0], 0)


def _write_run(root, norms, window=3, clip=None, seed=3):
    """A work dir as MMEngine leaves it: the logged running means of ``norms``
    (group -> per-iteration values) in ``<timestamp>/vis_data/scalars.json``,
    and the config dumped beside it."""
    vis = root / '20261128_100017' / 'vis_data'
    vis.mkdir(parents=True)
    groups = list(norms)
    iters = len(norms[groups[0]])
    with open(vis / 'scalars.json', 'w') as f:
        for k in range(iters):
            row = {f'grad_norm.{g}': sum(v[max(0, k + 1 - window):k + 1]) / min(k + 1, window)
                   for g, v in norms.items()}
            f.write(json.dumps(dict(row, loss=1.0, epoch=1, iter=k + 1, step=k + 1)) + '\n')
    (vis / 'config.py').write_text(
        f'log_processor = dict(type="LogProcessor", window_size={window})\n'
        f'optim_wrapper = dict(clip_grad={clip!r})\nrandomness = dict(seed={seed})\n')
    return str(root)


def test_the_figure_plots_every_group_of_both_runs(tmp_path, capsys):
    diverging = _write_run(tmp_path / 'noclip', {
        'backbone.stem': [1.0, 2.0, 4.0, 1e3, 1e6],
        'backbone.stage1.global': [0.1, 0.2, 0.1, 5.0, 1e8], 'neck': [3.0, 3.0, 5.0, 1e4, 1e7]})
    healthy = _write_run(tmp_path / 'clip', {
        'backbone.stem': [1.0, 2.0, 1.5, 1.0, 1.2, 1.0], 'neck': [3.0, 2.0, 2.5, 2.0, 2.0, 2.0],
        'backbone.stage1.local': [0.5] * 6}, clip=dict(max_norm=35), window=2)
    series = sd.grad_norms(diverging)
    assert list(series['norms']) == ['backbone.stem', 'backbone.stage1.global', 'neck']
    assert series['norms']['backbone.stage1.global'] == pytest.approx([0.1, 0.2, 0.1, 5.0, 1e8])
    assert (series['seed'], series['clip'], series['window']) == (3, None, 3)
    assert sd._title(sd.grad_norms(healthy)) == 'clip: seed 3, clipped at 35 (the norms after it)'
    figure = tmp_path / 'grad_norms.png'
    result = run.main(['seeds', '--plot', diverging, healthy, '--figure', str(figure)])
    assert figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert result['runs'][diverging] == dict(iterations=5, window=3,
                                             peak_group='backbone.stage1.global',
                                             peak=pytest.approx(1e8))
    assert 'largest norm 1e+08 in backbone.stage1.global' in capsys.readouterr().out


def test_a_run_without_group_norms_or_with_gaps_is_refused(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match='not a trained work dir'):
        sd.grad_norms(str(tmp_path))
    run_dir = _write_run(tmp_path / 'r', {'neck': [1.0, 2.0, 3.0]})
    scalars = sd.scalars_file(run_dir)
    rows = [json.loads(line) for line in open(scalars)]
    with open(scalars, 'w') as f:  # logged every other iteration
        f.writelines(json.dumps(dict(r, iter=2 * r['iter'])) + '\n' for r in rows)
    with pytest.raises(ValueError, match='at every iteration from the first'):
        sd.grad_norms(run_dir)
    with pytest.raises(SystemExit) as info:
        run.main(['seeds', '--plot', str(tmp_path / 'nosuch'), run_dir])
    assert info.value.code == 2 and 'no such run' in capsys.readouterr().err


def test_the_dry_run_checks_every_variants_config_and_trains_nothing(tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv(DETECTION.data_variable, str(tmp_path / 'nowhere'))
    path = tmp_path / 'seeds.json'
    with one_thread():
        run.main(['seeds', '--dry-run', '--seeds', '0', '1', '--no-clip',
                  '--work-dir', str(tmp_path / 'runs'), '--json', str(path)])
    result = json.loads(path.read_text())['result']
    assert [(r['variant'], r['seed']) for r in result['runs']] == [
        (v, s) for s in (0, 1) for v in ('autograd', 'closed_form', 'local')]
    assert not result['data_present'] and not (tmp_path / 'nowhere').exists()
    assert all('exit_status' not in r and 'optim_wrapper.clip_grad=None' in r['command']
               for r in result['runs'])
    out = capsys.readouterr().out
    assert '| 1 | not trained | not trained | not trained |' in out
    assert 'closed_form_noclip_s1 ' in out


def test_a_config_whose_first_hook_is_not_the_guard_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        run.main(['seeds', '--dry-run', '--seeds', '0', '--variants', 'local',
                  '--cfg-options', 'custom_hooks.0.type=EMAHook'])
    assert info.value.code == 2 and 'custom_hooks.0 is' in capsys.readouterr().err


@pytest.mark.slow
def test_a_diverging_run_is_stopped_by_the_hook_and_parsed(tmp_path, monkeypatch):
    """One real run: the detection demo on 8 generated images (2 iterations),
    local-only, at an lr that overflows after the first step."""
    from convneur_mm.demo_data.coco import generate_coco_tiny
    root = tmp_path / 'coco_tiny'
    generate_coco_tiny(str(root), num_train=8, num_val=2)
    monkeypatch.setenv(DETECTION.data_variable, str(root) + '/')
    result = sd.run('detection', seeds=[0], variants=['local'], length=1,
                    extra=['optim_wrapper.optimizer.lr=1e30'], work_dir=str(tmp_path / 'runs'))
    (entry, ) = result['runs']
    assert entry['exit_status'] != 0 and entry['first_nonfinite'] == 2, entry
    assert entry['stop_message'].startswith('non-finite training at iteration 2 (epoch 1)')
    assert entry['stop_group'] and sd.run_verdict(entry) == 'stopped'


def test_a_crash_after_a_nan_without_the_hooks_error_is_no_stop():
    crash = dict(first_nonfinite=40, exit_status=1, stop_message=None)
    assert sd.run_verdict(crash) == 'failed'
    assert sd.run_verdict(dict(crash, stop_message='non-finite training at iteration 40')) == \
        'stopped'
    assert sd.run_verdict(dict(crash, exit_status=0)) == 'unstopped'


def test_the_detection_demos_peer_swaps_in_convnextv2_pico_and_only_there():
    options = sd.run_options(DETECTION, 'convnextv2_pico', 0, 3)
    assert options[options.index('model.backbone._delete_=True') + 1] == \
        'model.backbone.type=mmpretrain.ConvNeXt'
    assert 'model.backbone.arch=pico' in options
    with pytest.raises(ValueError, match='variant must be one of'):
        sd.run_options(sd.DEMOS['classification'], 'convnextv2_pico', 0, 3)
    assert sd.all_variants() == ['autograd', 'closed_form', 'local', 'convnextv2_pico']


def test_the_peers_options_build_its_backbone_under_the_detector():
    """The options replace the whole backbone dict: MMPretrain's ConvNeXt-V2-P
    (its widths M3's, so the neck fits) builds, and its groups are named."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from convneur_mm.engine.finite_check import module_groups
    cfg = sd.check_options(DETECTION, sd.run_options(DETECTION, 'convnextv2_pico', 0, 3))
    assert set(cfg.model.backbone) == {'type', 'arch', 'use_grn', 'layer_scale_init_value',
                                       'out_indices', 'drop_path_rate',
                                       'gap_before_final_norm'}
    init_default_scope('mmdet')
    backbone = MODELS.build(cfg.model.backbone)
    assert type(backbone).__name__ == 'ConvNeXt' and backbone.arch_settings['pico']
    groups = module_groups(_Detector(backbone))
    assert {'backbone.stem', 'backbone.stage1.local', 'backbone.stage4.local'} <= set(groups)


class _Detector(torch.nn.Module):
    """A backbone where a detector holds it."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def _metrics_log(top1, top5=100.0):
    return ('## cls.py @ epoch_16.pth\n| metric | value |\n|---|---|\n'
            f'| accuracy/top1 | {top1} |\n| accuracy/top5 | {top5} |\n')


@pytest.mark.parametrize('top1,status,verdict,cell', [
    (72.0, 0, 'in band', '0.5; accuracy/top1 72, accuracy/top5 100'),
    (25.0, 0, 'outside band', 'OUTSIDE: accuracy/top1 25 is outside its band 30-100'),
    (None, 1, 'failed', 'no metrics; test failed (exit 1)'),
])
def test_an_evaluated_run_is_tested_on_its_last_checkpoint_and_banded(
        tmp_path, monkeypatch, top1, status, verdict, cell):
    run_dir = tmp_path / 'autograd_s0'
    run_dir.mkdir()
    (run_dir / 'epoch_16.pth').write_bytes(b'x')
    (run_dir / 'last_checkpoint').write_text(str(run_dir / 'epoch_16.pth'))
    commands = []

    def fake_run(command, stdout, stderr, env):
        commands.append(command)
        stdout.write('' if top1 is None else _metrics_log(top1))
        return type('Done', (), {'returncode': status})()

    monkeypatch.setattr(sd.subprocess, 'run', fake_run)
    tested = sd.evaluate_one('classification', str(run_dir), ['a.b=1'], {}, processes=2)
    (command, ) = commands
    assert command[0].endswith('tools/dist_test.sh') and command[2:] == [
        str(run_dir / 'epoch_16.pth'), '2', '--work-dir', str(run_dir / 'test'),
        '--cfg-options', 'a.b=1']
    assert (run_dir / 'epoch_16.pth').exists() == bool(status)  # kept to test again
    entry = dict(sd.parse_log(HEALTHY)._asdict(), exit_status=0, **tested)
    entry['losses'][-1] = 0.5
    assert sd.run_verdict(entry) == verdict and cell in sd.run_cell(entry)


def test_a_variant_without_options_tests_without_cfg_options():
    """``--cfg-options`` with no value is an error of tools/test.py."""
    assert sd.test_command(DETECTION, 'c.pth', 'w', [])[-2:] == ['--work-dir', 'w']


def test_a_run_without_a_checkpoint_fails_its_evaluation(tmp_path):
    tested = sd.evaluate_one('classification', str(tmp_path), [], {})
    entry = dict(sd.parse_log(HEALTHY)._asdict(), exit_status=0, **tested)
    assert sd.run_verdict(entry) == 'failed'
    assert sd.run_cell(entry) == '4.1; not tested: no last_checkpoint'


def test_only_a_run_that_trained_is_tested_and_never_an_old_sweeps_checkpoint(
        tmp_path, monkeypatch):
    """A stopped, unstopped or failed run is not evaluated (its cell keeps
    the NaN); a pointer an earlier sweep left is removed before training."""
    outputs = iter([(HEALTHY, 0), (STOPPED, 1), (NAN, 0), (HEALTHY, 1)])
    tested, pointers = [], []
    runs = tmp_path / 'runs'

    def fake_train_one(command, log_path, env, report_every=0):
        pointers.append(os.path.exists(os.path.join(os.path.dirname(log_path),
                                                    'last_checkpoint')))
        text, status = next(outputs)
        return dict(sd.parse_log(text)._asdict(), exit_status=status, seconds=1.0)

    monkeypatch.setattr(sd, 'train_one', fake_train_one)
    monkeypatch.setattr(sd, 'evaluate_one', lambda demo, run_dir, *a: tested.append(run_dir)
                        or dict(test_exit_status=0, metrics={'bbox AP': 80.0},
                                band_problems=[]))
    monkeypatch.setattr(sd, '_data_root', lambda spec, dry: ('data', True))
    (runs / 'autograd_s0').mkdir(parents=True)
    (runs / 'autograd_s0' / 'last_checkpoint').write_text('old.pth')
    result = sd.run('detection', seeds=[0, 1], variants=['autograd', 'local'],
                    work_dir=str(runs), evaluate=True)
    assert pointers == [False] * 4 and tested == [str(runs / 'autograd_s0')]
    assert [sd.run_verdict(r) for r in result['runs']] == ['in band', 'stopped', 'unstopped',
                                                           'failed']
    assert 'NaN; non-finite at 4, NOT stopped' in sd.run_cell(result['runs'][2])


def test_evaluating_trains_the_configs_schedule_and_keeps_its_checkpoint(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv(DETECTION.data_variable, str(tmp_path / 'nowhere'))
    with one_thread():
        result = run.main(['seeds', '--dry-run', '--evaluate', '--seeds', '0',
                           '--variants', 'local', '--work-dir', str(tmp_path / 'runs')])
    (entry, ) = result['runs']
    assert 'max_epochs' not in entry['command'] and sd.NO_CHECKPOINT not in entry['command']
    assert result['length'] == 8 and result['evaluate']
    assert '8 epochs, each run tested and checked against its band' in capsys.readouterr().out
