"""How ``tools/train.py`` and ``tools/test.py`` end: exit status 0 once their
work is done, non-zero when it failed (issue 17).

The abort this guards against, seen after ``tools/dist_test.sh`` had printed
its metrics ("terminate called without an active exception", SIGABRT, so
torchrun reported the run as failed), is a PyTorch race at interpreter
shut-down (torch 2.13, gloo; upstream: pytorch/pytorch#190489, open).

The thread that is still running - joinable, never joined - when the
interpreter is torn down is gloo's worker thread (``pt_gloo_runloop``,
``ProcessGroupGloo::runLoop``) of the default process group. It marks a
collective complete, which wakes the Python caller, and only afterwards drops
its own reference to the work. When the caller has already let go of the
tensors (MMEngine's ``broadcast_object_list`` of the metrics is the last
collective of an evaluation), that reference is the last one, and freeing the
tensor's Python object takes the GIL. If the main thread has meanwhile left
the tool and ``Py_FinalizeEx`` has marked the interpreter as finalizing,
CPython's ``take_gil`` ends the worker with ``pthread_exit``; the forced unwind
meets a ``noexcept`` destructor (``~AsyncWork``) and the C++ runtime calls
``std::terminate``. Only sometimes: the worker loses the race only when it is
descheduled between its two steps for longer than the main thread takes to
reach finalization, which a second busy process on a 2-core machine makes
likely (issue 17: 2 of 7 evaluations; docs/exit_codes.md has our counts and
a 10-line reproduction).

``torch.distributed.destroy_process_group()`` does not close the window: it
only unregisters the group. The DistributedDataParallel wrapper of the
runner's model keeps ``ProcessGroupGloo`` alive, so its destructor, which
would join the worker threads, does not run before interpreter finalization.
Freeing the wrapper first does not help: its ``Reducer`` is deallocated with
the GIL held, and the group's destructor then joins a worker that waits for
the GIL (a deadlock; docs/exit_codes.md).

Hence, once a tool's work is done and written, :func:`exit_successfully`
meets the other ranks at a barrier, destroys the process group, does what a
normal interpreter exit does that matters (stops idle thread pools and joins
non-daemon threads, runs the
``atexit`` handlers, e.g. logging's flush and close, flushes stdout/stderr),
and then leaves with ``os._exit``: the interpreter tear-down in which the
abort happens is skipped. Every failure before that point - an exception, a
killed rank, a failed collective, a peer gone before the final barrier -
still ends the process the usual way, with a non-zero status.
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
