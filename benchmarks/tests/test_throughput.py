"""The training-throughput benchmark: its configs, batches and a dry run (CPU)."""
import json
import math

import pytest
import torch

from benchmarks import run
from benchmarks.common.record import Record
from benchmarks.training import throughput as tt
from convneur_mm.apis.launch import load_config


def _parse(argv):
    return run.parse_args(['train'] + argv)


def test_peers_swap_the_backbone_and_the_widths_that_read_it():
    upernet = tt.JOBS['upernet-m4']
    resnet = tt.variant_config(upernet, 'resnet50').model
    assert resnet.backbone.type == 'ResNetV1c'
    assert resnet.decode_head.in_channels == list(tt.RESNET50_WIDTHS)
    assert resnet.auxiliary_head.in_channels == tt.RESNET50_WIDTHS[2]  # its in_index
    convnext = tt.variant_config(upernet, 'convnextv2').model
    assert (convnext.backbone.type, convnext.backbone.arch) == ('mmpretrain.ConvNeXt', 'nano')
    assert convnext.decode_head.in_channels == load_config(
        upernet.config).model.decode_head.in_channels  # nano has M4's widths
    local = tt.variant_config(upernet, 'local-only').model
    assert local.backbone.memory_placement == 'none'
    kernels = tt.variant_config(upernet, 'kernels').model.backbone
    base = load_config(upernet.config).model.backbone
    assert kernels.memory_cfg.implementation == 'triton'
    assert {k: v for k, v in kernels.memory_cfg.items() if k != 'implementation'} == {
        k: v for k, v in base.memory_cfg.items() if k != 'implementation'}


def test_the_kernels_row_is_asked_for_and_skipped_where_they_cannot_run(monkeypatch):
    """Not a default peer; on a CPU without the interpreter its row says why
    it was not timed, and the other variants train in their turns."""
    from convneur_mm.models.layers.memory_ops import dispatch
    assert 'kernels' not in _parse([]).peers
    assert tt._kernels_unavailable('cpu') is not None  # no interpreter in this process
    # a rerun on the PyTorch path would time it under the kernels' name
    monkeypatch.setattr(dispatch, 'FORCED_IMPLEMENTATION', 'torch')
    assert 'CONVNEUR_MEMORY_IMPLEMENTATION=torch' in tt._kernels_unavailable('cuda')
    monkeypatch.setattr(tt, '_kernels_unavailable', lambda device: 'no GPU here')
    job = tt.run_job('cls-m3', ('local-only', 'kernels'), dry=True, iters=1, warmup=0)
    assert job['errors'] == {
        'ConvNeur-M3 kernels': 'skipped: the kernels cannot run here (no GPU here)'}
    assert set(job['train']) == {'ConvNeur-M3', 'ConvNeur-M3 local-only'}
    assert all(row['status'] == 'ok' for row in job['train'].values())


def test_resnet_peer_downloads_nothing_and_a_classifier_gets_its_pooling():
    detector = tt.variant_config(tt.JOBS['cascade-m3'], 'resnet50').model
    assert detector.backbone.init_cfg is None
    assert detector.neck.in_channels == list(tt.RESNET50_WIDTHS)
    classifier = tt.variant_config(tt.JOBS['cls-m3'], 'resnet50').model
    assert classifier.neck.type == 'GlobalAveragePooling'
    assert classifier.head.in_channels == tt.RESNET50_WIDTHS[-1]


def test_training_config_runs_every_iteration_the_same_work():
    cfg = tt.prepare_training(tt.variant_config(tt.JOBS['cls-m3']), amp=True)
    assert cfg.optim_wrapper.accumulative_counts == 1 and cfg.optim_wrapper.optimizer.lr == 0
    assert cfg.optim_wrapper.type == 'convneur_mm.CpuAmpOptimWrapper'  # --amp on this CPU


@pytest.mark.parametrize('job, train, test', [
    ('cascade-m3', (800, 1333), (800, 1333)),
    ('fpn-m3', (512, 512), (512, 2048)),
    ('cls-m3', (224, 224), (224, 224)),
])
def test_image_sizes_come_from_the_pipelines(job, train, test):
    assert tt.image_sizes(load_config(tt.JOBS[job].config)) == (train, test)


def test_detection_batch_carries_boxes_and_masks_inside_the_image():
    cfg = load_config(tt.JOBS['cascade-m3'].config)
    batch = tt.synthetic_batch(cfg, (96, 128), 2, training=True)
    assert [tuple(x.shape) for x in batch['inputs']] == [(3, 96, 128)] * 2
    gt = batch['data_samples'][0].gt_instances
    boxes = gt.bboxes.tensor
    assert len(gt) == tt.INSTANCES_PER_IMAGE and gt.masks.masks.shape[1:] == (96, 128)
    assert (boxes[:, :2] < boxes[:, 2:]).all() and (boxes[:, 2:] <= boxes.new_tensor(
        [128, 96])).all()
    assert gt.masks.masks.sum() > 0


def test_bad_jobs_and_peers_are_refused():
    with pytest.raises(ValueError, match='job must be one of'):
        tt.run_job('mask-rcnn')
    with pytest.raises(ValueError, match='peers must be among'):
        tt.run_job('fpn-m3', peers=['swin'])


def _check_rows(rows, names, key):
    assert set(rows) == set(names)
    for name, row in rows.items():
        assert row['status'] == 'ok', (name, row)
        assert math.isfinite(row[key]) and row[key] > 0
        assert row['peak_allocated_bytes'] >= row['held_bytes'] > 0
        assert row['peak_reserved_bytes'] is None  # not measurable on a CPU


def test_dry_run_trains_and_evaluates_every_peer_in_turns(capsys):
    args = _parse(['--dry-run', '--jobs', 'cls-m3', '--eval'])
    result = tt.run_from_args(args, Record(None, 'train'))
    job = result['jobs']['cls-m3']
    names = ['ConvNeur-M3', 'ConvNeur-M3 local-only', 'ConvNeXt-V2-P', 'ResNet-50']
    assert not job['errors'] and job['batch'] == 1
    assert job['per_gpu_batch'] == load_config(tt.JOBS['cls-m3'].config).train_dataloader.batch_size
    _check_rows(job['train'], names, 's_per_iter')
    for row in job['train'].values():
        assert len(row['s_all']) == result['iters']
        assert row['spread'] == tt.relative_spread(row['s_all'])
        assert row['images_per_s'] == pytest.approx(row['batch'] / row['s_per_iter'])
        assert row['fits_24gb'] == (row['peak_allocated_bytes'] + tt.CONTEXT_BYTES
                                    <= tt.CARD_BYTES)
        assert row['vs_local_only'] > 0
    _check_rows(job['eval'], names, 's_per_image')
    assert 'cpu' in result['device'].lower()
    json.dumps(result)  # the GPU script writes it
    captured = capsys.readouterr()
    assert all(f'| {name} |' in captured.out for name in names) and 's/image' in captured.out
    assert "| s/iter | spread |" in captured.out and "| s/image | spread |" in captured.out
    # each job's table also goes to stderr as it ends: a run cut short keeps it
    assert all(f'| cls-m3 | {name} |' in captured.err for name in names)


def test_fits_card_prefers_the_reserved_peak():
    peak = dict(peak_allocated_bytes=10 * tt.GIB, peak_reserved_bytes=24 * tt.GIB)
    assert not tt.fits_card(peak)
    assert tt.fits_card(dict(peak, peak_reserved_bytes=None))


@pytest.mark.slow
@pytest.mark.parametrize('job', ['cascade-m2', 'cascade-m3', 'fpn-m3', 'upernet-m4'])
def test_dry_run_of_the_other_jobs(job):
    result = tt.run(jobs=[job], dry=True, evaluate=True)
    r = result['jobs'][job]
    assert not r['errors']
    assert all(row['status'] == 'ok' for row in list(r['train'].values()) +
               list(r['eval'].values()))


def test_the_record_is_written_after_every_job(tmp_path, monkeypatch):
    """A run cut short (a GPU run's timeout) keeps the jobs it measured."""
    seen = []
    monkeypatch.setattr(tt, 'run_job', lambda name, *args: dict(
        train={}, eval=None, errors={}, config=name))
    monkeypatch.setattr(tt, 'format_tables', lambda result: '')
    record = Record(str(tmp_path / 'train.json'), 'train')
    monkeypatch.setattr(record, 'write', lambda result: seen.append(list(result['jobs'])))
    args = run.build_parser('train').parse_args(['train', '--dry-run', '--jobs', 'cls-m3',
                                                 'fpn-m3', '--peers'])
    tt.run_from_args(args, record)
    assert seen == [['cls-m3'], ['cls-m3', 'fpn-m3']]


def test_the_guarded_variant_runs_the_hooks_checks_in_the_same_turns(capsys):
    """--guarded adds ConvNeur with NonFiniteStopHook, timed beside it; its
    steps really check: a NaN weight stops the guarded step, not the plain one."""
    from convneur_mm.engine.finite_check import NonFiniteTrainingError
    args = _parse(['--dry-run', '--jobs', 'cls-m3', '--peers', '--guarded'])
    job = tt.run_from_args(args, Record(None, 'train'))['jobs']['cls-m3']
    _check_rows(job['train'], ['ConvNeur-M3', 'ConvNeur-M3 + NonFiniteStopHook'], 's_per_iter')
    row = job['train']['ConvNeur-M3 + NonFiniteStopHook']
    assert row['vs_unguarded'] == pytest.approx(
        row['s_per_iter'] / job['train']['ConvNeur-M3']['s_per_iter'])
    assert 'ConvNeur-M3 + NonFiniteStopHook takes' in capsys.readouterr().out

    cfg = tt.prepare_training(tt.variant_config(tt.JOBS['cls-m3']))
    data = tt.synthetic_batch(cfg, (64, 64), 1, True)
    plain = tt.build_variant('M3', cfg, 'cpu')
    guarded = tt.guard(tt.build_variant('M3', cfg, 'cpu'))
    with pytest.raises(NonFiniteTrainingError, match='loss terms loss=nan'):  # the loss check
        guarded.after_step({'loss': torch.tensor(float('nan'))})
    calls = []
    counted = guarded._replace(after_step=lambda outputs: calls.append(sorted(outputs)))
    rows = tt.measure_training([plain, counted], data, 1, 'cpu', iters=2, warmup=1)
    assert len(calls) == 4 and 'loss' in calls[0]  # warm-up, memory window, 2 timed turns
    assert rows['M3']['status'] == 'ok'
    # two turns: half their difference over the upper one
    first, second = rows['M3']['s_all']
    assert rows['M3']['spread'] == pytest.approx(abs(first - second) / 2 / max(first, second))
    assert rows['M3']['spread'] > 0
    evaluated = tt.measure_evaluation([plain], data, 1, 'cpu', iters=3, warmup=0)['M3']
    assert evaluated['spread'] == tt.relative_spread(evaluated['s_all']) > 0

    for variant in (plain, guarded):  # the gradient check, before the optimizer's step
        next(variant.model.parameters()).data.fill_(float('nan'))
    rows = tt.measure_training([plain, guarded], data, 1, 'cpu', iters=1, warmup=0)
    assert rows['M3']['status'] == 'ok'  # unguarded, a NaN trains on
    assert rows['M3' + tt.GUARDED]['status'].startswith(
        'stopped by NonFiniteStopHook: non-finite training at iteration 1')


def test_a_variant_that_fails_ends_its_row_only():
    """A variant's compile error or OOM, in the warm-up or its memory
    window: its row records it, the other variants are timed."""
    class Model(torch.nn.Module):
        def __init__(self, fail_after: int):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.calls, self.fail_after = 0, fail_after

        def train_step(self, data, optim_wrapper):
            self.calls += 1
            if self.calls > self.fail_after:
                raise RuntimeError('CUDA out of memory (a stand-in)')
            return {}

    variants = [tt.Variant('ok', None, Model(10 ** 6), None),
                tt.Variant('fails in the warm-up', None, Model(0), None),
                tt.Variant('fails in its window', None, Model(1), None)]
    rows = tt.measure_training(variants, {}, 2, 'cpu', iters=2, warmup=1)
    assert rows['ok']['status'] == 'ok' and rows['ok']['s_per_iter'] > 0
    for name in ('fails in the warm-up', 'fails in its window'):
        assert rows[name]['status'].startswith('error: RuntimeError: CUDA out of memory')
