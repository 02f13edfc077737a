"""One intra-op thread for the tests that train: on 2 shared cores OpenMP's
spinning threads are oversubscribed and a training step gets 10x slower."""
from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    """torch runs on one intra-op thread inside; the previous count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
