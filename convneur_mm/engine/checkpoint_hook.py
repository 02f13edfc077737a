"""Checkpoints that survive a run killed while writing one.

MMEngine 0.10.7 writes a checkpoint in place (``open(path, 'wb')``), and its
``CheckpointHook`` removes the checkpoint that ``max_keep_ckpts`` pushes out,
and the previous best one (``save_best``), *before* it writes the new one. A
run killed while writing (the minutes a large checkpoint takes on a busy
shared file system) can lose its resume point: with ``max_keep_ckpts=1``
nothing is left, and a checkpoint rewritten in place (MMEngine saves
``iter_N.pth`` again after a new best) is cut short under the name that
``last_checkpoint`` gives. Here:

* ``ConvNeurRunner.save_checkpoint`` writes to ``NAME.part``, flushes it to
  disk and renames it to ``NAME`` (local directories; a rename is atomic),
  so a checkpoint file is whole or absent, also after a machine crash;
  ``.part`` files a killed run left are removed when the next run starts;
* ``SafeCheckpointHook`` runs MMEngine's own logic with the removals held back
  until the new checkpoint and ``last_checkpoint`` are written; a save that
  raises removes nothing. The cost is disk space for one more checkpoint
  while one is written; a run killed between the write and the removal
  leaves the old checkpoint on disk, unlisted (MMEngine has already dropped
  it from ``keep_ckpt_ids``).

``ConvNeurRunner`` builds the hook wherever a config asks for MMEngine's
``CheckpointHook`` (subclasses of it are built as configured).
"""
import glob
import os
import os.path as osp
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, get_file_backend
from mmengine.hooks import CheckpointHook

PART_SUFFIX = '.part'


def writes_locally(out_dir: str, file_client_args: Optional[dict] = None,
                   backend_args: Optional[dict] = None) -> bool:
    """Whether MMEngine saves into ``out_dir`` on a local file system (where
    ``os.replace`` is atomic); not for ``file_client_args`` or remote backends."""
    return (file_client_args is None
            and isinstance(get_file_backend(out_dir, backend_args=backend_args), LocalBackend))


def replace_durably(src: str, dst: str) -> None:
    """Rename the complete file ``src`` to ``dst``, its data and the rename on
    disk first: a machine crash right after could otherwise leave ``dst``
    empty (rename before data on some file systems) with the previous
    checkpoint already removed."""
    _fsync(src, os.O_RDONLY)
    os.replace(src, dst)
    _fsync(osp.dirname(dst) or '.', os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # a file system without fsync of directories: nothing to wait for
        pass
    finally:
        os.close(fd)


class _DeferredRemovals:
    """A file backend whose ``remove`` and ``rmtree`` wait for ``flush``."""

    def __init__(self, backend):
        self.backend = backend
        self.pending: List[Tuple[Callable[[str], None], str]] = []

    def remove(self, path: str) -> None:
        self.pending.append((self.backend.remove, path))

    def rmtree(self, path: str) -> None:
        self.pending.append((self.backend.rmtree, path))

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def flush(self, keep: set) -> None:
        """Remove what was asked, except a path written since (a name reused)."""
        for remove, path in self.pending:
            if path not in keep:
                remove(path)


class SafeCheckpointHook(CheckpointHook):
    """MMEngine's ``CheckpointHook``, removing old checkpoints only after the
    new one is written."""

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process() and writes_locally(self.out_dir, self.file_client_args,
                                                self.backend_args):
            for part in sorted(glob.glob(osp.join(glob.escape(self.out_dir), '*' + PART_SUFFIX))):
                os.remove(part)
                runner.logger.info(f'Removed {part}, a checkpoint a killed run did not finish')

    @contextmanager
    def _removals_last(self) -> Iterator[None]:
        if isinstance(self.file_backend, _DeferredRemovals):  # nested: the outer call removes
            yield
            return
        backend = self.file_backend
        self.file_backend = deferred = _DeferredRemovals(backend)
        try:
            yield
        finally:
            self.file_backend = backend
        deferred.flush(keep=self._current_paths())  # not reached if the save raised

    def _current_paths(self) -> set:
        best = getattr(self, 'best_ckpt_path_dict', None) or {}
        return {self.last_ckpt, getattr(self, 'best_ckpt_path', None), *best.values()}

    def _save_checkpoint_with_step(self, runner, step, meta):
        with self._removals_last():
            super()._save_checkpoint_with_step(runner, step, meta)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        with self._removals_last():
            super()._save_best_checkpoint(runner, metrics)
