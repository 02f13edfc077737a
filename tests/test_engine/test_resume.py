"""Resuming: a run killed in the middle of an epoch and resumed with
``tools/train.py --resume`` continues from its last checkpoint and then trains
exactly as the run that was never interrupted; a damaged checkpoint is a clear
error, not a silent restart.

MMEngine 0.10.7 alone gets neither right (both measured below, in the toy runs):
its epoch-based loop replays a resumed epoch from the first batch, and no
checkpoint holds the random generators' states, so augmentations, Mixup/CutMix
and stochastic depth draw other numbers after the resume point.
``ConvNeurRunner`` fixes both (``convneur_mm/engine/resume.py``).
"""
import glob
import json
import os
import os.path as osp
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from mmengine.dataset import default_collate
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

from convneur_mm.demo_data.imagenet import generate_imagenet_tiny
from convneur_mm.engine.resume import (RNG_KEY, RngStateHook, capture_rng_state,
                                       gather_rng_states, rank_state, restore_rng_state)
from convneur_mm.engine.runner import ConvNeurRunner
from convneur_mm.models.utils.pretrained import CheckpointMismatchError
from convneur_mm.utils.checkpoint_safety import CorruptCheckpointError
from ..devices import DEVICES
from ..paths import REPO

DEMO = osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py')


# ------------------------------------------------ toy runs, in this process
class NoisyModel(BaseModel):
    """A loss with every kind of randomness a real run has: torch (dropout,
    stochastic depth), NumPy and Python (batch augmentations)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='loss'):
        if mode == 'predict':
            return [dict(pred=p) for p in self.linear(inputs).squeeze(1)]
        out = self.linear(inputs * (1 + 0.1 * torch.rand_like(inputs))).squeeze(1)
        noise = float(np.random.rand()) + 0.01 * random.random()
        return dict(loss=(out - labels).square().mean() * (1 + noise))


class NoisyData(torch.utils.data.Dataset):
    """A pipeline that draws from NumPy's global generator, as mmcv's do."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([i, 1.0]) + float(np.random.randn()),
                    labels=torch.tensor(i * 0.5))


class PredictionCount(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results += [1] * len(data_samples)

    def compute_metrics(self, results):
        return dict(count=len(results))


class LossRecorder(Hook):
    def __init__(self):
        self.losses = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses[runner.iter + 1] = float(outputs['loss'])


def _toy_run(runner_cls, work_dir, by_epoch, resume_from=None, name='run', validate=False,
             randomness=dict(seed=0), checkpoint=dict(interval=3, by_epoch=False),
             model_cls=None, resume=None):
    """18 iterations, a checkpoint every 3; ``validate``: a validation after
    each epoch (every 3 iterations when iteration-based), its data as
    random as the training's."""
    recorder = LossRecorder()
    loop = dict(by_epoch=True, max_epochs=3) if by_epoch else dict(by_epoch=False,
                                                                    max_iters=18)
    val = {}
    if validate:
        loop['val_interval'] = 1 if by_epoch else 3
        val = dict(val_dataloader=dict(dataset=NoisyData(), batch_size=4,
                                       collate_fn=default_collate,
                                       sampler=dict(type='DefaultSampler', shuffle=True)),
                   val_cfg=dict(), val_evaluator=[PredictionCount()])
    runner = runner_cls(
        model=(model_cls or NoisyModel)(), work_dir=str(work_dir),
        experiment_name=f'{name}_{time.time()}',
        train_dataloader=dict(dataset=NoisyData(), batch_size=2, collate_fn=default_collate,
                              sampler=dict(type='DefaultSampler' if by_epoch else
                                           'InfiniteSampler', shuffle=True)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        # the lr halves after every epoch (6 iterations): its scheduler steps in
        # the end-of-epoch hooks of the epoch-based loop
        param_scheduler=dict(type='MultiStepLR', by_epoch=by_epoch, gamma=0.5,
                             milestones=[1, 2] if by_epoch else [6, 12]),
        train_cfg=loop, custom_hooks=[recorder],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', **checkpoint)),
        randomness=randomness, load_from=resume_from,
        resume=resume_from is not None if resume is None else resume,
        default_scope='mmengine', **val)
    runner.train()
    return recorder.losses


# 18 iterations, 6 per epoch (the iteration-based run, with the InfiniteSampler of
# the segmentation configs, goes through the data 3 times too), a checkpoint
# every 3 iterations: iter_6 is taken after the last batch of epoch 1 (before
# its end-of-epoch hooks, e.g. by-epoch schedulers), iter_9 halfway into epoch 2.
@pytest.mark.parametrize('by_epoch', [True, False], ids=['epoch-based', 'iter-based'])
@pytest.mark.parametrize('device', DEVICES)
def test_resumed_toy_run_continues_exactly(tmp_path, by_epoch, device):
    """On CUDA (a process that sees the GPU) the CUDA generator's state is
    stored too, and the checkpoint is mapped to the GPU on load."""
    full = _toy_run(ConvNeurRunner, tmp_path / 'full', by_epoch, name='full')
    assert sorted(full) == list(range(1, 19))
    for ckpt in (6, 9):
        resumed = _toy_run(ConvNeurRunner, tmp_path / f'resumed{ckpt}', by_epoch,
                           resume_from=str(tmp_path / 'full' / f'iter_{ckpt}.pth'),
                           name=f'resumed{ckpt}')
        assert sorted(resumed) == list(range(ckpt + 1, 19))
        assert resumed == {i: full[i] for i in resumed}
    if device == 'cuda':
        checkpoint = torch.load(tmp_path / 'full' / 'iter_9.pth', weights_only=True)
        (state, ) = checkpoint['meta']['rng_state']['ranks']
        assert 'cuda' in state  # the CUDA generator was stored, and so restored


@pytest.mark.parametrize('by_epoch, checkpoints', [
    (True, [(6, 'epoch_1.pth'), (12, 'epoch_2.pth')]),  # per epoch, saving the best
    (False, [(6, 'iter_6.pth'), (9, 'iter_9.pth')]),  # per 3 iterations, as the ADE20K ones
], ids=['epoch-based', 'iter-based'])
def test_validation_after_the_checkpoint_changes_nothing(tmp_path, by_epoch, checkpoints):
    """Validation runs after the checkpoint of its iteration (or epoch) and
    draws from the generators (the DataLoader iterator's base seed, the
    pipeline's NumPy draws): the training after it draws as the run resumed
    from that checkpoint does. With ``save_best``, MMEngine writes the best
    checkpoint and, after a new best, ``epoch_N.pth`` again, during
    validation: they hold training's states too. (Without ``RngStateHook``'s
    restore after validation, or with the states of the moment stored, the
    losses after the first validation differ.)"""
    checkpoint = (dict(interval=1, by_epoch=True, save_best='count', rule='greater')
                  if by_epoch else dict(interval=3, by_epoch=False))
    full = _toy_run(ConvNeurRunner, tmp_path / 'full', by_epoch, name='full', validate=True,
                    checkpoint=checkpoint)
    for at, filename in checkpoints:
        resumed = _toy_run(ConvNeurRunner, tmp_path / f'resumed{at}', by_epoch,
                           resume_from=str(tmp_path / 'full' / filename),
                           name=f'resumed{at}', validate=True, checkpoint=checkpoint)
        assert sorted(resumed) == list(range(at + 1, 19))
        assert resumed == {i: full[i] for i in resumed}


@pytest.mark.parametrize('by_epoch', [True, False], ids=['epoch-based', 'iter-based'])
def test_mmengine_runner_alone_does_not(tmp_path, by_epoch):
    """The same resume with MMEngine's Runner: the comparison above can fail."""
    full = _toy_run(ConvNeurRunner, tmp_path / 'full', by_epoch, name='full')
    resumed = _toy_run(Runner, tmp_path / 'resumed', by_epoch,
                       resume_from=str(tmp_path / 'full' / 'iter_9.pth'), name='plain')
    if by_epoch:  # epoch 2 replayed from its first batch: 3 iterations too many
        assert sorted(resumed) == list(range(10, 22))
    else:  # the right batches, but the generators restarted from the seed
        assert sorted(resumed) == list(range(10, 19))
    assert resumed[10] != pytest.approx(full[10], rel=1e-6)


# -------------------------------------- tools/train.py, killed and resumed
@pytest.fixture(scope='module')
def tiny_imagenet(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('imagenet_tiny'))
    generate_imagenet_tiny(root, train_per_class=2, val_per_class=1)
    return root


# 20 images in batches of 4: epochs of 5 iterations, 2 epochs; a checkpoint
# every 3 iterations (iter_3: in the middle of epoch 1; iter_6, iter_9: of
# epoch 2); every iteration's raw loss in vis_data/scalars.json.
SHORT = ['train_dataloader.batch_size=4', 'train_cfg.max_epochs=2', 'val_cfg=None',
         'val_dataloader=None', 'val_evaluator=None', 'default_hooks.checkpoint.interval=3',
         'default_hooks.checkpoint.by_epoch=False', 'default_hooks.checkpoint.max_keep_ckpts=-1',
         'default_hooks.logger.interval=1', 'log_processor.window_size=1']


def _train_cmd(work_dir, *extra):
    return [sys.executable, osp.join(REPO, 'tools', 'train.py'), DEMO, '--work-dir',
            str(work_dir), '--seed', '0', '--deterministic', *extra, '--cfg-options', *SHORT]


def _env(data_root):
    # one intra-op thread: two of these runs share 2 cores
    return dict(os.environ, IMAGENET_TINY_ROOT=data_root, OMP_NUM_THREADS='1')


def _logged_losses(log_dir) -> dict:
    losses = {}
    for line in open(osp.join(log_dir, 'vis_data', 'scalars.json')):
        record = json.loads(line)
        if 'loss' in record:
            losses[record['step']] = record['loss']
    return losses


def _run_dirs(work_dir):
    """The timestamped log folders of the runs into ``work_dir``, oldest first."""
    return sorted(d for d in glob.glob(osp.join(str(work_dir), '2*')) if osp.isdir(d))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tiny_imagenet, tmp_path):
    env = _env(tiny_imagenet)
    full_dir, work_dir = tmp_path / 'full', tmp_path / 'killed'
    # the uninterrupted run and the one to be killed, side by side
    full = subprocess.Popen(_train_cmd(full_dir), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim_log = open(tmp_path / 'victim.log', 'w')
    victim = subprocess.Popen(_train_cmd(work_dir), cwd=REPO, env=env,
                              stdout=victim_log, stderr=subprocess.STDOUT)
    # kill it as soon as its first checkpoint is complete (CheckpointHook names
    # it in last_checkpoint after writing it), 3 iterations into epoch 1 of 5
    pointer = work_dir / 'last_checkpoint'
    deadline = time.time() + 240
    while victim.poll() is None and time.time() < deadline and not (
            pointer.is_file() and pointer.read_text().strip()):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim_log.close()
    assert victim.wait() == -signal.SIGKILL, (tmp_path / 'victim.log').read_text()[-3000:]
    assert pointer.read_text().endswith('iter_3.pth')
    assert sorted(p.name for p in work_dir.glob('iter_*.pth')) == ['iter_3.pth']

    resume = subprocess.run(_train_cmd(work_dir, '--resume'), cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert resume.returncode == 0, resume.stderr[-3000:]
    _, err = full.communicate()
    assert full.returncode == 0, err[-3000:]

    # (a) it continued from the checkpoint: iteration 3, mid-epoch, skipping
    # the 3 batches of epoch 1 trained before it
    assert 'resumed epoch: 0, iter: 3' in resume.stderr + resume.stdout
    assert 'skipping its first 3 batches' in resume.stderr + resume.stdout
    reference = _logged_losses(_run_dirs(full_dir)[-1])
    assert sorted(reference) == list(range(1, 11))
    resumed = _logged_losses(_run_dirs(work_dir)[-1])
    assert sorted(resumed) == list(range(4, 11))
    # (b) ... and trained as the uninterrupted run did: same losses (Mixup/CutMix,
    # RandAugment, Random Erasing and stochastic depth all draw random numbers)
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    # down to the final weights
    ours = torch.load(work_dir / 'iter_10.pth', weights_only=True)['state_dict']
    theirs = torch.load(full_dir / 'iter_10.pth', weights_only=True)['state_dict']
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-7, msg=key)


# `--resume PATH` is a `slow` case: `--resume` alone finds the same damaged file
@pytest.mark.parametrize('how', [pytest.param('path', marks=pytest.mark.slow), 'auto'])
def test_damaged_checkpoint_is_a_clear_error_not_a_restart(tiny_imagenet, tmp_path, how):
    """A checkpoint cut short (the run killed while writing it), named by
    ``--resume PATH`` or found by ``--resume`` through last_checkpoint."""
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    whole = tmp_path / 'whole.pth'
    torch.save(dict(meta=dict(iter=3), state_dict=nn.Linear(64, 64).state_dict()), whole)
    damaged = work_dir / 'iter_3.pth'
    damaged.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    (work_dir / 'last_checkpoint').write_text(str(damaged))
    extra = ['--resume', str(damaged)] if how == 'path' else ['--resume']
    result = subprocess.run(_train_cmd(work_dir, *extra), cwd=REPO, env=_env(tiny_imagenet),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert 'CorruptCheckpointError' in result.stderr, result.stderr[-3000:]
    assert f'{damaged} is not a complete checkpoint' in result.stderr
    assert 'Epoch(train)' not in result.stdout + result.stderr  # nothing trained
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_3.pth']


def test_missing_resume_checkpoint_names_the_path(tiny_imagenet, tmp_path):
    missing = tmp_path / 'nowhere' / 'iter_3.pth'
    result = subprocess.run(_train_cmd(tmp_path / 'work', '--resume', str(missing)),
                            cwd=REPO, env=_env(tiny_imagenet), capture_output=True, text=True)
    assert result.returncode != 0
    assert f'checkpoint to resume from not found: {missing}' in result.stderr
    assert CorruptCheckpointError.__name__ not in result.stderr


class WiderModel(NoisyModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)


@pytest.mark.parametrize('how', ['path', 'last_checkpoint'])
def test_a_checkpoint_of_another_model_stops_the_resume(tmp_path, how):
    """MMEngine resumes without strict: another config's checkpoint failed
    deep in the optimizer's state, or trained on half-loaded. Resumed by
    path or from the work dir's last_checkpoint, it stops first."""
    _toy_run(ConvNeurRunner, tmp_path, by_epoch=False)
    last = (tmp_path / 'last_checkpoint').read_text().strip()
    with pytest.raises(CheckpointMismatchError, match='shape mismatches: linear.weight'):
        if how == 'path':
            _toy_run(ConvNeurRunner, tmp_path / 'other', by_epoch=False, resume_from=last,
                     model_cls=WiderModel)
        else:
            _toy_run(ConvNeurRunner, tmp_path, by_epoch=False, model_cls=WiderModel,
                     resume=True)


# ------------------------------------------- generator states on CUDA machines
def _draws():
    return (random.random(), float(np.random.rand()), float(torch.rand(1)))


def _checkpoint_with_states(path, states):
    torch.save(dict(meta={RNG_KEY: states}, state_dict={}), path)


def test_states_restore_wherever_map_location_put_the_checkpoint(tmp_path):
    """MMEngine loads with map_location = the process's GPU, which moves every
    tensor; torch's setters take CPU byte tensors only. Mapped to the meta
    device here (no data at all): the states must still come back."""
    torch.manual_seed(3)
    state = capture_rng_state()
    expected = _draws()
    _checkpoint_with_states(tmp_path / 'c.pth', dict(ranks=[state]))
    loaded = torch.load(tmp_path / 'c.pth', weights_only=True, map_location='meta')
    restore_rng_state(rank_state(loaded['meta'][RNG_KEY], 0))
    assert _draws() == expected


def _rank_states_worker(rank, world_size, path):
    """Each rank seeds its own generators, the hook stores everyone's states
    (rank 0 writes), then each rank restores from the file mapped to meta."""
    from mmengine.dist import barrier
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(rank)
    class Runner:  # what RngStateHook sees of ConvNeurRunner
        is_resuming = True
    runner = Runner()
    # ConvNeurRunner.save_checkpoint on every rank; MMEngine's hook call on rank 0 only
    runner.gathered_rng_states = gather_rng_states()
    checkpoint = {}
    if rank == 0:
        RngStateHook().before_save_checkpoint(runner, checkpoint)
        torch.save(checkpoint, path)
    expected = _draws()
    barrier()
    _draws()  # move on, as training does
    RngStateHook().after_load_checkpoint(
        runner, torch.load(path, weights_only=True, map_location='meta'))
    restore_rng_state(runner.resumed_rng_state)
    stored = torch.load(path, weights_only=True)['meta'][RNG_KEY]['ranks']
    return dict(expected=expected, restored=_draws(), stored=len(stored))


def test_each_rank_gets_back_its_own_states(tmp_path):
    from .dist_utils import run_distributed
    results = run_distributed(_rank_states_worker, 2, str(tmp_path / 'c.pth'))
    for rank, result in enumerate(results):
        assert result['stored'] == 2
        assert result['restored'] == result['expected'], rank
    assert results[0]['expected'] != results[1]['expected']  # the ranks' streams differ


def test_checkpoints_from_before_per_rank_states_restore_rank_0():
    """Older checkpoints hold one state, as tensors: rank 0's."""
    torch.manual_seed(5)
    old = capture_rng_state()
    old = dict(old, torch=torch.get_rng_state(),
               numpy=dict(old['numpy'], keys=torch.from_numpy(
                   np.frombuffer(old['numpy']['keys'], dtype=np.uint32).astype(np.int64))))
    expected = _draws()
    assert rank_state(old, 1) is None
    restore_rng_state(rank_state(old, 0))
    assert _draws() == expected


def test_a_validation_that_raised_leaves_no_training_states_behind():
    """``after_val`` does not run when validation raises: the next training
    must not store the states captured before it in its checkpoints."""
    from types import SimpleNamespace
    hook, runner = RngStateHook(), SimpleNamespace(training_rng_state=None)
    hook.before_val(runner)
    assert runner.training_rng_state is not None
    hook.before_train(runner)  # runner.train() again, in the same process
    assert runner.training_rng_state is None


@pytest.mark.parametrize('by_epoch', [True, False], ids=['epoch-based', 'iter-based'])
def test_a_stop_on_another_rank_stops_this_one(tmp_path, monkeypatch, by_epoch):
    """A hook that stops one rank's loop alone left it waiting at the run's
    end, the others in their next step's collectives, until the process
    group's timeout. The loops agree before each epoch (each iteration):
    here the stand-in for the other ranks stops at its third agreement."""
    from convneur_mm.engine import resume
    calls = []

    def other_rank_stops_at_the_third(flag, op):
        assert op == 'max'
        calls.append(float(flag))
        if len(calls) >= 3:
            flag.fill_(1.0)
    monkeypatch.setattr(resume, 'is_distributed', lambda: True)
    monkeypatch.setattr(resume, 'all_reduce', other_rank_stops_at_the_third)
    losses = _toy_run(ConvNeurRunner, tmp_path, by_epoch,
                      checkpoint=dict(interval=100, by_epoch=False))
    # two epochs of 6 iterations, or two iterations, then every rank stops
    assert sorted(losses) == list(range(1, 13 if by_epoch else 3))
    assert calls == [0.0, 0.0, 0.0]
