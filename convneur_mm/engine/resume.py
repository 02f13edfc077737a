"""Resuming a run exactly where its checkpoint left off.

MMEngine 0.10.7 does not restore two things: the random generators (a resumed
run restarts from the seed, so augmentations, Mixup/CutMix, stochastic depth
and RoI sampling differ from the interrupted run), and, in
``EpochBasedTrainLoop``, the position inside an epoch (a mid-epoch checkpoint
replays the epoch from its first batch).

So every checkpoint stores every rank's generator states (``RngStateHook``;
``ConvNeurRunner.save_checkpoint`` gathers them, as only rank 0 saves), and
the train loops below skip the batches already trained, loading them so that
samplers and workers advance as before, then restore the states before the
first batch not yet trained. ``RngStateHook`` also puts training's states
back after a validation, which draws from the generators too. The states are
stored as bytes: ``map_location`` moves tensors to the GPU, and torch's RNG
setters take CPU tensors only. The loops also agree on stopping across ranks
(``agreed_stop``).
"""
import logging
import random
from typing import Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, all_reduce, get_rank, get_world_size, is_distributed
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

RNG_KEY = 'rng_state'


def capture_rng_state() -> dict:
    """This process's generator states, as types a weights-only load accepts
    and ``map_location`` does not move: bytes, ints, tuples."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = dict(python=random.getstate(),
                 numpy=dict(keys=keys.astype(np.uint32).tobytes(), pos=int(pos),
                            has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian)),
                 torch=torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state().numpy().tobytes()  # this rank's device
    return state


def _cpu_bytes(value) -> torch.Tensor:
    """A CPU uint8 tensor from stored bytes (or from a tensor, the older
    checkpoint format, wherever it was mapped)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to('cpu', torch.uint8)
    return torch.frombuffer(bytearray(value), dtype=torch.uint8)


def restore_rng_state(state: dict) -> None:
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state['numpy']
    keys = numpy['keys']
    keys = (np.frombuffer(keys, dtype=np.uint32) if isinstance(keys, bytes) else
            keys.detach().cpu().numpy().astype(np.uint32))
    np.random.set_state(('MT19937', keys, numpy['pos'], numpy['has_gauss'],
                         numpy['cached_gaussian']))
    torch.set_rng_state(_cpu_bytes(state['torch']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_cpu_bytes(state['cuda']))  # the current device's generator


def gather_rng_states(state: Optional[dict] = None) -> list:
    """Every rank's states (``state``, default: its current ones), on every
    rank (a collective: all ranks call it)."""
    return all_gather_object(state or capture_rng_state())


def rank_state(stored: Optional[dict], rank: int) -> Optional[dict]:
    """The states rank ``rank`` stored (None if that rank did not exist). A
    checkpoint in the older single-rank format holds rank 0's."""
    if stored is None:
        return None
    ranks = stored['ranks'] if 'ranks' in stored else [stored]
    return ranks[rank] if rank < len(ranks) else None


class RngStateHook(Hook):
    """Puts the generator states into every checkpoint's ``meta``, and, when the
    run resumes, hands the stored states to the train loop."""
    priority = 'VERY_HIGH'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # rank 0 only: the states of every rank were gathered just before
        states = getattr(runner, 'gathered_rng_states', None) or [capture_rng_state()]
        runner.gathered_rng_states = None
        checkpoint.setdefault('meta', {})[RNG_KEY] = dict(ranks=states)

    def before_train(self, runner) -> None:
        runner.training_rng_state = None  # left by a validation that raised

    def before_val(self, runner) -> None:
        runner.training_rng_state = capture_rng_state()

    def after_val(self, runner) -> None:
        state, runner.training_rng_state = runner.training_rng_state, None
        if state is not None:
            restore_rng_state(state)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, 'is_resuming', False):
            return
        stored = checkpoint.get('meta', {}).get(RNG_KEY)
        count = len(stored['ranks']) if stored and 'ranks' in stored else 1
        if stored is not None and count != get_world_size():
            print_log(f'the checkpoint holds the generator states of {count} processes, this '
                      f'run has {get_world_size()}: ranks without stored states start from '
                      'the seed', logger='current', level=logging.WARNING)
        runner.resumed_rng_state = rank_state(stored, get_rank())


def _pop_resumed_rng_state(runner) -> Optional[dict]:
    state = getattr(runner, 'resumed_rng_state', None)
    runner.resumed_rng_state = None
    return state


class _RestoreRngBeforeBatch:
    """Iterator proxy that restores ``state`` just before fetching the batch
    after the first ``skip`` ones."""

    def __init__(self, iterator, skip: int, state: dict):
        self._iterator, self._skip, self._state = iterator, skip, state

    def __iter__(self):
        return self

    def __next__(self):
        if self._state is not None and self._skip <= 0:
            restore_rng_state(self._state)
            self._state = None
        self._skip -= 1
        return next(self._iterator)

    def __getattr__(self, name):
        return getattr(self._iterator, name)


def agreed_stop(loop) -> bool:
    """``loop.stop_training``, made every rank's where any rank's is set: a
    rank whose own hook stopped it would otherwise wait at the run's end
    while the others wait for it in the next step's collectives, until the
    process group's timeout (30 minutes)."""
    if not is_distributed():
        return bool(loop.stop_training)
    flag = torch.tensor([float(bool(loop.stop_training))])
    all_reduce(flag, op='max')
    stop = bool(flag.item())
    if stop and not loop.stop_training:
        print_log('another rank stopped the training loop: stopping here too',
                  logger='current', level=logging.WARNING)
    loop.stop_training = stop
    return stop


def _validate_if_due(loop, done: int, last: int) -> None:
    """MMEngine's validation after an iteration (epoch), as both its loops
    decide it: ``done`` iterations (epochs) trained of ``last``."""
    loop._decide_current_val_interval()
    if (loop.runner.val_loop is not None and done >= loop.val_begin
            and (done % loop.val_interval == 0 or done == last)):
        loop.runner.val_loop.run()


class ResumableIterBasedTrainLoop(IterBasedTrainLoop):
    """MMEngine's loop (which skips the batches trained before the checkpoint),
    with the generators restored to the checkpoint's states after the skip,
    and the decision to stop agreed by every rank after each iteration (one
    scalar all-reduce; NonFiniteStopHook reads one back per iteration too)."""

    def run(self):
        state = _pop_resumed_rng_state(self.runner)
        if state is not None:
            self.dataloader_iterator = _RestoreRngBeforeBatch(
                self.dataloader_iterator, self._iter, state)
        # MMEngine 0.10.7's IterBasedTrainLoop.run, with agreed_stop in its condition
        self.runner.call_hook('before_train')
        self.runner.call_hook('before_train_epoch')
        if self._iter > 0:
            print_log(f'Advance dataloader {self._iter} steps to skip data that has '
                      'already been trained', logger='current', level=logging.WARNING)
            for _ in range(self._iter):
                next(self.dataloader_iterator)
        while self._iter < self._max_iters and not agreed_stop(self):
            self.runner.model.train()
            data_batch = next(self.dataloader_iterator)
            self.run_iter(data_batch)
            _validate_if_due(self, self._iter, self._max_iters)
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model


class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """MMEngine's loop; resumed in the middle of an epoch, it skips the batches
    of that epoch trained before the checkpoint instead of training them again,
    and restores the checkpoint's generator states after the skip. The
    decision to stop is agreed by every rank before each epoch."""

    def run(self):
        self._resumed_epoch = self._iter > 0  # only the first epoch run may be partial
        # MMEngine 0.10.7's EpochBasedTrainLoop.run, with agreed_stop in its condition
        self.runner.call_hook('before_train')
        while self._epoch < self._max_epochs and not agreed_stop(self):
            self.run_epoch()
            _validate_if_due(self, self._epoch, self._max_epochs)
        self.runner.call_hook('after_train')
        return self.runner.model

    def run_epoch(self) -> None:
        state = _pop_resumed_rng_state(self.runner)
        done = 0
        if getattr(self, '_resumed_epoch', False):
            self._resumed_epoch = False
            done = self._iter - self._epoch * len(self.dataloader)
            if not 0 <= done <= len(self.dataloader):
                print_log(f'resumed at iteration {self._iter}, which is not in epoch '
                          f'{self._epoch + 1} of {len(self.dataloader)} iterations (another '
                          'batch size or number of processes?): the epoch starts from its '
                          'first batch', logger='current', level=logging.WARNING)
                done = 0
        if state is None and done == 0:
            return super().run_epoch()
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        if done == 0:  # an epoch checkpoint: taken before this epoch began
            restore_rng_state(state)
        if done == len(self.dataloader):  # taken after the epoch's last batch
            print_log(f'Resuming after the last batch of epoch {self._epoch + 1}',
                      logger='current', level=logging.WARNING)
            if state is not None:
                restore_rng_state(state)
            batches = iter(())
        else:
            # a new DataLoader iterator draws its base seed from torch's generator
            batches = iter(self.dataloader)
        if 0 < done < len(self.dataloader):  # taken after batch `done` of this epoch
            print_log(f'Resuming in the middle of epoch {self._epoch + 1}: skipping its '
                      f'first {done} batches, trained before the checkpoint',
                      logger='current', level=logging.WARNING)
            for _ in range(done):
                next(batches)
            if state is not None:
                restore_rng_state(state)
        for idx, data_batch in enumerate(batches, start=done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1


RESUMABLE_LOOPS = {EpochBasedTrainLoop: ResumableEpochBasedTrainLoop,
                   IterBasedTrainLoop: ResumableIterBasedTrainLoop}
