"""Weights-only checkpoint loading with one explicit allow-list.

torch >= 2.6 loads with ``weights_only=True``; MMEngine 0.10.7 calls
``torch.load`` without the argument, so its own Runner checkpoints (which
pickle a ``HistoryBuffer`` of numpy arrays in the message hub) fail to load.
Turning weights-only loading off would let any checkpoint run arbitrary code,
so instead we allow exactly the types that Runner checkpoints contain, and
replace MMEngine's local-file loader with one that names the refused type.

One more thing stands in the way: ``HistoryBuffer.__getstate__`` pickles its
class-level table of statistics functions, which pickle encodes as
``builtins.getattr(HistoryBuffer, 'min')``. Allowing ``getattr`` would open
the weights-only unpickler far beyond our types, so a ``copyreg`` reducer (the
standard way to define pickling for a class one does not own) writes
HistoryBuffers without that table; loading rebuilds it from the class, where
MMEngine keeps it anyway. A checkpoint written without ``convneur_mm`` still
holds the table: for it, ``builtins.getattr`` is a function that returns
HistoryBuffer's four statistics methods and refuses anything else (torch >= 2.6).
"""
import copyreg
import hashlib
import importlib
import os.path as osp
import pickle
import zipfile
from typing import List

import numpy as np
import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint wants to unpickle a type outside the allow-list."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is not a whole torch checkpoint (truncated by a
    run killed while writing it, or not a checkpoint at all)."""


def _corrupt(filename: str, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f'{filename} is not a complete checkpoint ({osp.getsize(filename)} bytes; '
        f'truncated or corrupt - was its run killed while writing it?): {detail}. '
        'If it is the newest checkpoint of an interrupted run, resume from the one '
        'before it (--resume PATH).')


def _check_complete(filename: str) -> None:
    """torch.save writes a zip archive (whose directory is at the end, so a
    truncated file has none) or, in the legacy format, a pickle."""
    if zipfile.is_zipfile(filename):
        return
    with open(filename, 'rb') as f:
        head = f.read(2)
    if head[:1] != b'\x80':  # the legacy format starts with a pickle PROTO opcode
        raise _corrupt(filename, 'neither a zip archive nor a legacy torch pickle')


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks (converters record their source's)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def allowed_globals() -> List[object]:
    """Everything beyond tensors and builtins that our checkpoints pickle."""
    from mmengine.logging.history_buffer import HistoryBuffer
    multiarray = importlib.import_module(
        'numpy._core.multiarray' if np.__version__ >= '2' else 'numpy.core.multiarray')
    return [
        HistoryBuffer,  # MessageHub.log_scalars
        multiarray._reconstruct,  # numpy arrays inside it
        multiarray.scalar,  # numpy scalars
        np.ndarray,
        np.dtype,
        *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)},
    ]


def load_from_local(filename: str, map_location=None) -> dict:
    """MMEngine's loader for local paths (same name, so its log line reads
    "by local backend"), weights-only, with a clear refusal."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    _check_complete(filename)
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except (EOFError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise _corrupt(filename, repr(err)) from err
    except RuntimeError as err:  # torch's words for a damaged zip or legacy file
        if any(s in str(err) for s in ('PytorchStreamReader', 'unexpected EOF', 'corrupt')):
            raise _corrupt(filename, str(err).splitlines()[0]) from err
        raise
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f'Refusing to load {filename}: it contains Python objects outside '
            'the weights-only allow-list of convneur_mm.utils.checkpoint_safety '
            f'(a checkpoint from an unknown source may run arbitrary code).\n{err}'
        ) from None


def _history_buffer_method(owner, name: str):
    """What a checkpoint pickled without ``convneur_mm`` asks of ``getattr``:
    a statistics method of ``HistoryBuffer`` (``getattr(HistoryBuffer,
    'min')``), and nothing else; registered as ``builtins.getattr`` for the
    weights-only unpickler only, where a general getattr would reach any
    object's attributes."""
    from mmengine.logging.history_buffer import HistoryBuffer
    if owner is HistoryBuffer and name in HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({getattr(owner, "__name__", type(owner).__name__)}, {name!r}) is outside the '
        'weights-only allow-list: only HistoryBuffer\'s statistics methods are allowed')


# the statistics MMEngine's HistoryBuffer registers itself (``_statistics_methods``)
HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')


def _reduce_history_buffer(buffer):
    state = {k: v for k, v in vars(buffer).items() if k != 'statistics_methods'}
    return type(buffer), (), state


_installed = False


def install() -> None:
    """Allow-list our checkpoint types and take over local checkpoint loading."""
    global _installed
    if _installed:
        return
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    torch.serialization.add_safe_globals(allowed_globals())
    # a Runner checkpoint written without convneur_mm pickles its statistics table
    # as getattr(HistoryBuffer, name): a getattr of that form only. Named globals
    # came with torch 2.6; an older one would store the pair and fail every load.
    if torch.__version__ >= '2.6':
        torch.serialization.add_safe_globals([(_history_buffer_method, 'builtins.getattr')])
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local)
    _installed = True
