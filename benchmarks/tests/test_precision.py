"""16-bit against float32 training: the runs' configs, the agreement's
arithmetic and its verdict, and a dry run of the tool (slow)."""
import math
import os
import os.path as osp

import pytest
import torch

from benchmarks import run
from benchmarks.common.record import Record
from benchmarks.training import precision as pt
from convneur_mm.demo_data.imagenet import generate_imagenet_tiny

from tests.threads import one_thread

NO_RECORD = Record(None, 'precision')  # nothing written


def _run(precision, seed, losses, top1):
    return dict(precision=precision, seed=seed, losses=list(losses), top1=[top1], seconds=1.0)


def _runs(shift=0.0, top1_shift=0.0, seeds=(0, 1, 2), iters=30, other='bfloat16'):
    """float32 and ``other`` at ``seeds``: seed s's loss curve falls from
    2 + 0.1 s; ``other``'s is float32's plus ``shift``."""
    runs = []
    for s in seeds:
        curve = [2.0 + 0.1 * s - i / iters for i in range(iters)]
        runs.append(_run('float32', s, curve, 80.0 + s))
        runs.append(_run(other, s, [v + shift for v in curve], 80.0 + s + top1_shift))
    return runs


def test_identical_precisions_agree_and_the_numbers_are_the_seeds():
    a = pt.agreement(_runs(), windows=3)
    assert a['agree'] and a['iters'] == 30 and a['seeds'] == [0, 1, 2]
    assert list(a['against_float32']) == ['bfloat16']
    a = a['against_float32']['bfloat16']
    late = a['late_loss']
    # the last 10 iterations of seeds 0..2 average 2 - 24.5/30 + 0.1 s
    assert late['float32']['mean'] == pytest.approx(2.0 - 24.5 / 30 + 0.1)
    assert late['float32']['range'] == pytest.approx(0.2) and late['gap'] == 0.0
    assert late['paired'] == [0.0, 0.0, 0.0] and late['spread'] == pytest.approx(0.2)
    assert a['top1']['float32'] == dict(mean=81.0, range=2.0)
    assert [w['iters'] for w in a['curve']] == [[1, 10], [11, 20], [21, 30]]


def test_a_shift_beyond_the_seeds_spread_disagrees_and_one_within_agrees():
    assert pt.agreement(_runs(shift=0.15))['agree']
    far = pt.agreement(_runs(shift=0.25))['against_float32']['bfloat16']
    assert not far['agree'] and not far['late_loss']['within'] and far['top1']['within']
    assert all(not w['within'] for w in far['curve'])
    top1 = pt.agreement(_runs(top1_shift=-3.0))['against_float32']['bfloat16']
    assert not top1['agree'] and top1['late_loss']['within'] and not top1['top1']['within']


def test_a_diverged_seed_shows_as_nan_and_disagrees():
    runs = _runs()
    runs[2]['losses'][-1] = float('nan')  # float32's seed 1 diverged at its last iteration
    late = pt.agreement(runs)['against_float32']['bfloat16']['late_loss']
    assert math.isnan(late['float32']['range']) and math.isnan(late['spread'])
    assert not late['within']


def test_the_yardstick_is_float32s_spread_not_a_noisier_precisions():
    runs = _runs(shift=0.25)
    for r in runs:  # bf16's seeds spread 0.6 apart, float32's 0.2
        if r['precision'] == 'bfloat16':
            r['losses'] = [v + 0.2 * (r['seed'] - 1) for v in r['losses']]
    late = pt.agreement(runs)['against_float32']['bfloat16']['late_loss']
    assert late['bfloat16']['range'] == pytest.approx(0.6) and late['spread'] == pytest.approx(0.2)
    assert late['paired'] == pytest.approx([0.05, 0.25, 0.45]) and not late['within']


def test_each_precision_is_judged_against_float32_on_its_own():
    fp16 = [r for r in _runs(shift=0.25, other='float16') if r['precision'] == 'float16']
    a = pt.agreement(_runs() + fp16)
    assert a['against_float32']['bfloat16']['agree']
    assert not a['against_float32']['float16']['agree'] and not a['agree']


@pytest.mark.parametrize('runs,match', [
    (_runs()[:-1], 'same seeds'),
    ([r for r in _runs() if r['precision'] == 'float32'], 'float32 and another'),
    (_runs(seeds=(0, )), 'two or more'),
    (_runs() + _runs(seeds=(0, )), 'two or more distinct'),
    (_runs()[:-1] + [_run('bfloat16', 2, [1.0] * 29, 80.0)], 'different lengths'),
])
def test_runs_that_do_not_pair_up_are_refused(runs, match):
    with pytest.raises(ValueError, match=match):
        pt.agreement(runs)


def test_windows_past_the_iterations_are_refused():
    with pytest.raises(ValueError, match=r'windows must be in \[1, 30\]'):
        pt.agreement(_runs(), windows=31)


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    """30 training images: 1 iteration per epoch at the demo's batch of 32."""
    root = tmp_path_factory.mktemp('imagenet') / 'tiny'
    generate_imagenet_tiny(str(root), train_per_class=3, val_per_class=1)
    return str(root)


def test_run_configs_train_whole_epochs_in_their_precision(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv(pt.DATA_ROOT_VARIABLE, tiny_root)
    f32 = pt.run_config(pt.DEFAULT_CONFIG, 'float32', 3, 9, str(tmp_path))
    assert pt.iterations_per_epoch(f32) == 1
    assert (f32.train_cfg.max_epochs, f32.train_cfg.val_interval) == (9, 2)
    assert f32.randomness.seed == 3 and f32.default_hooks.checkpoint is None
    assert f32.default_hooks.logger.interval == 1
    assert f32.auto_scale_lr == dict(base_batch_size=64, enable=True)  # the demo's 2 x 32
    assert f32.optim_wrapper.get('type', 'OptimWrapper') == 'OptimWrapper'
    assert f32.model.backbone.memory_cfg.get('operand_dtype', 'auto') == 'auto'
    assert f32.work_dir.endswith('float32_seed3') and f32.experiment_name == 'float32_seed3'
    bf16 = pt.run_config(pt.DEFAULT_CONFIG, 'bfloat16', 3, 9, str(tmp_path))
    assert bf16.optim_wrapper.type == 'convneur_mm.CpuAmpOptimWrapper'
    assert bf16.model.backbone.memory_cfg.operand_dtype == 'bfloat16'
    assert bf16.model.backbone.memory_cfg.chunk_size == 196  # the rest of it kept


def test_bf16_sets_the_memorys_products_without_memory_cfg_and_spares_other_backbones(
        tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv(pt.DATA_ROOT_VARIABLE, tiny_root)
    bare = pt.run_config(pt.DEFAULT_CONFIG, 'bfloat16', 0, 2, str(tmp_path),
                         {'model.backbone.memory_cfg': None})
    assert bare.model.backbone.memory_cfg == dict(operand_dtype='bfloat16')
    resnet = pt.run_config(pt.DEFAULT_CONFIG, 'bfloat16', 0, 2, str(tmp_path),
                           {'model.backbone': dict(_delete_=True, type='ResNet', depth=18)})
    assert 'memory_cfg' not in resnet.model.backbone


def test_missing_data_says_how_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.setenv(pt.DATA_ROOT_VARIABLE, str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='IMAGENET_TINY_ROOT=/path/to/data/'):
        pt.run_config(pt.DEFAULT_CONFIG, 'float32', 0, 4, str(tmp_path))


@pytest.mark.slow  # generates the default tiny set, as a user's first run does
def test_the_default_configs_missing_data_is_generated_into_the_work_dir(tmp_path,
                                                                        monkeypatch):
    monkeypatch.delenv(pt.DATA_ROOT_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)  # no data/imagenet_tiny here
    roots = []

    def fake_train_run(cfg, device):
        roots.append(cfg.train_dataloader.dataset.data_root)
        return dict(losses=[1.0] * 30, top1=[50.0], top1_iters=[30], seconds=1.0)

    monkeypatch.setattr(pt, 'train_run', fake_train_run)
    result = pt.run(seeds=(0, 1), iters=30, work_dir='runs')
    assert set(roots) == {osp.join('runs', 'imagenet_tiny')} and result['agreement']['agree']
    assert pt.DATA_ROOT_VARIABLE not in os.environ  # set while the configs load only
    monkeypatch.setenv(pt.DATA_ROOT_VARIABLE, roots[0])
    whole = pt.run_config(pt.DEFAULT_CONFIG, 'float32', 0, 30, 'runs')
    assert pt.iterations_per_epoch(whole) == 15  # the demo's 480 images, 32 a batch


def test_windows_past_the_iterations_stop_before_any_run_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(pt, 'train_run', lambda cfg, device: pytest.fail('trained'))
    with pytest.raises(ValueError, match='windows must be at most the 20 iterations'):
        pt.run(seeds=(0, 1), iters=20, windows=21, work_dir=str(tmp_path))


def test_a_run_of_one_epoch_or_an_unknown_precision_is_refused(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv(pt.DATA_ROOT_VARIABLE, tiny_root)
    with pytest.raises(ValueError, match='at least two epochs.*at least 2'):
        pt.run_config(pt.DEFAULT_CONFIG, 'float32', 0, 1, str(tmp_path))
    with pytest.raises(ValueError, match='precision must be one of'):
        pt.run_config(pt.DEFAULT_CONFIG, 'float64', 0, 4, str(tmp_path))


@pytest.mark.parametrize('argv,says', [
    (['--seeds', '1'], 'argument --seeds: need two or more distinct seeds'),
    (['--seeds', '1', '1'], 'argument --seeds: need two or more distinct seeds'),
    (['--precisions', 'bfloat16'], 'need float32 and another precision'),
    (['--precisions', 'float32', 'float32'], 'named twice'),
    (['--precisions', 'float32', 'int8'], 'precision must be one of'),
])
def test_impossible_seeds_and_precisions_are_usage_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as info:
        run.parse_args(['precision'] + argv)
    assert info.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='float16 trains on a GPU')
def test_float16_without_a_gpu_is_refused_at_start():
    with pytest.raises(ValueError, match='float16 trains on a GPU only'):
        pt.check_precisions(['float32', 'float16'])


def test_a_failed_run_is_recorded_and_the_others_still_train(tiny_root, tmp_path, monkeypatch,
                                                           capsys):
    """Every config is built first; a run that raises leaves no verdict, exit 1."""
    monkeypatch.setenv(pt.DATA_ROOT_VARIABLE, tiny_root)
    trained = []

    def fake_train_run(cfg, device):
        trained.append(cfg.experiment_name)
        if cfg.experiment_name == 'bfloat16_seed0':
            raise RuntimeError('overflow\nin a kernel')
        return dict(losses=[2.0, 1.0], top1=[50.0], top1_iters=[2], seconds=1.0)

    monkeypatch.setattr(pt, 'train_run', fake_train_run)
    result = pt.run_from_args(run.parse_args(['precision', '--seeds', '0', '1', '--iters', '2',
                                              '--work-dir', str(tmp_path)]), NO_RECORD)
    assert trained == ['float32_seed0', 'bfloat16_seed0', 'float32_seed1', 'bfloat16_seed1']
    assert result['runs'][1]['error'] == 'error: RuntimeError: overflow in a kernel'
    assert result['agreement'] is None and result['exit_code'] == 1
    assert 'no verdict: 1 of 4 runs failed' in capsys.readouterr().out


def test_a_bad_config_stops_before_any_run_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(pt, 'train_run', lambda cfg, device: pytest.fail('trained'))
    with pytest.raises(ValueError, match='needs a classification config'):
        pt.run('demo/fpn_convneur_m2_ade20k_tiny.py', seeds=(0, 1), work_dir=str(tmp_path))


def test_the_figure_plots_every_run(tmp_path):
    runs = [dict(r, top1_iters=[30]) for r in _runs()]
    figure = tmp_path / 'curves.png'
    pt.plot_curves(dict(config='c.py', device='cpu', runs=runs, agreement=pt.agreement(runs)),
                   str(figure))
    assert figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_disagreement_is_exit_code_1_outside_a_dry_run(monkeypatch, capsys):
    def fake_run(*args, dry_run=False, **kwargs):
        runs = _runs(shift=1.0)
        return dict(config='c', device='cpu', torch='t', dry=dry_run, runs=runs,
                    agreement=pt.agreement(runs))

    monkeypatch.setattr(pt, 'run', fake_run)
    assert pt.run_from_args(run.parse_args(['precision']), NO_RECORD)['exit_code'] == 1
    assert 'does NOT agree' in capsys.readouterr().out
    assert 'exit_code' not in pt.run_from_args(run.parse_args(['precision', '--dry-run']),
                                               NO_RECORD)


@pytest.mark.gpu  # the mark, not a skipif: the parent hides the GPUs from its own torch
def test_float16_trains_under_amp_on_cuda(tmp_path):
    """Two iterations per run under fp16 --amp (AmpOptimWrapper, dynamic loss scale)."""
    result = pt.run(precisions=('float32', 'float16'), seeds=(0, 1), dry_run=True,
                    work_dir=str(tmp_path))
    assert result['device'] == 'cuda' and result['agreement'] is not None
    assert all(len(r['losses']) == pt.DRY_ITERS for r in result['runs'])


@pytest.mark.slow
def test_the_tool_trains_both_precisions_from_each_seed(tmp_path, capsys):
    """Four runs of two iterations of M1 on a generated handful of images."""
    out = tmp_path / 'precision.json'
    with one_thread():
        result = run.main(
            ['precision', '--dry-run', '--seeds', '0', '1', '--work-dir',
             str(tmp_path / 'runs'), '--json', str(out), '--figure', str(tmp_path / 'f.png')])
    assert [(r['precision'], r['seed']) for r in result['runs']] == [
        ('float32', 0), ('bfloat16', 0), ('float32', 1), ('bfloat16', 1)]
    for r in result['runs']:
        assert len(r['losses']) == pt.DRY_ITERS and r['top1_iters'][-1] == pt.DRY_ITERS
    f32, bf16 = result['runs'][0]['losses'], result['runs'][1]['losses']
    assert f32 != bf16 and f32 == pytest.approx(bf16, rel=2e-2)  # bf16 ran, close
    assert out.exists() and 'bfloat16 agrees with float32' in capsys.readouterr().out
    assert (tmp_path / 'f.png').stat().st_size > 0


def test_each_run_is_written_as_it_ends(tmp_path, monkeypatch):
    """A case killed before its last run keeps the runs it trained."""
    import argparse
    import json
    written = []

    def runs_then_killed(*args, on_run, **kwargs):
        on_run(_run('float32', 0, [2.0, 1.0], 80.0))
        written.append(json.loads((tmp_path / 'p.json').read_text()))
        raise KeyboardInterrupt  # the session's timeout, as it would stop the case

    monkeypatch.setattr(pt, 'run', runs_then_killed)
    args = argparse.Namespace(config=None, precisions=['float32', 'bfloat16'], seeds=[0, 1],
                              iters=2, work_dir=str(tmp_path), windows=None, dry_run=False,
                              figure=None)
    with pytest.raises(KeyboardInterrupt):
        pt.run_from_args(args, Record(str(tmp_path / 'p.json'), 'precision'))
    (record, ) = written
    assert record['result']['partial'] and record['result']['runs'][0]['top1'] == [80.0]
