"""How ``tools/train.py`` and ``tools/test.py`` end: exit status 0 once their
work is done, non-zero when it failed.

A PyTorch race at interpreter shut-down (gloo's worker thread freeing its
last work object while the interpreter finalizes; pytorch/pytorch#190489)
can abort a finished distributed run with SIGABRT, which torchrun reports as
a failure. ``destroy_process_group`` does not close that window. So, once a
tool's work is done and written, :func:`exit_successfully` meets the other
ranks at a barrier, destroys the process group, joins threads, runs the
``atexit`` handlers, flushes stdout/stderr and leaves with ``os._exit``,
skipping the tear-down in which the abort happens. Every failure before that
point still ends the process the usual way, with a non-zero status.
docs/advanced_guides/exit_codes.md explains the ending.
"""
import atexit
import os
import sys
import threading
from typing import NoReturn

import torch

# CPython's exit status when flushing stdout/stderr fails at exit
FLUSH_FAILED = 120


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shutdown_distributed() -> None:
    """Destroy the default process group, as PyTorch asks at the end of every
    distributed program (MMEngine's runner never does). Not for error paths:
    other ranks may still be inside a collective."""
    if _distributed():
        torch.distributed.destroy_process_group()


def _flush_std_streams() -> bool:
    """Flush stdout and stderr as CPython does at exit (closed ones skipped);
    False when the output could not be written (e.g. a closed pipe)."""
    ok = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None or getattr(stream, 'closed', False):
            continue
        try:
            stream.flush()
        except OSError:
            ok = False
    return ok


def _join_threads() -> None:
    """What CPython's shut-down does with threads, by the function it calls
    (``threading._shutdown``): first the hooks registered with
    ``threading._register_atexit``, which tell idle ``concurrent.futures``
    pool workers to stop (Inductor keeps such a pool for its C++ builds under
    ``--compile``: joining its workers without the hook waits forever), then
    a join of every non-daemon thread."""
    shutdown = getattr(threading, '_shutdown', None)
    if shutdown is not None:
        shutdown()
        return
    for thread in threading.enumerate():  # a Python without it: joins only
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()


def exit_successfully() -> NoReturn:
    """The last call of a tool whose work is done: exit status 0 (or 120, as
    CPython does, if the output cannot be flushed), never a late abort.

    The barrier keeps a rank from closing its connections while a peer is
    still inside the last collective; a failed peer makes it raise instead.
    """
    if _distributed():
        torch.distributed.barrier()
    shutdown_distributed()
    _join_threads()
    atexit._run_exitfuncs()  # logging.shutdown, multiprocessing's clean-up, ...
    os._exit(0 if _flush_std_streams() else FLUSH_FAILED)
