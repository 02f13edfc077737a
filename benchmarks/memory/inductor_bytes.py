"""The bytes that ``torch.compile``'s kernels move, as Inductor itself counts them.

``AtenOpCounter`` prices eager code: one kernel per ATen op. Compiled code
runs Inductor's kernels instead, each a fusion of many ops that reads its
inputs and writes its outputs once. ``InductorByteCounter`` reads Inductor's
own count of each generated kernel's (and each library product's) buffers,
read or written once, over every graph compiled inside the context: the
forward's, and the backward's where a backward runs there. The count is the
plan Inductor made for the device it compiled for (a CPU's fusions, here);
the code in the context runs for real.
"""
import contextlib
import logging

import torch


class InductorByteCounter:
    """Inside the context, ``torch.compile`` compiles afresh (Dynamo reset,
    no cached graphs: a cached graph is not lowered again, so not counted);
    on exit ``total_bytes`` holds the bytes its kernels move per call of
    each compiled graph. Exiting with nothing counted is an error: either
    nothing compiled, or this torch's Inductor no longer counts."""

    def __init__(self):
        self.total_bytes = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> 'InductorByteCounter':
        import torch._functorch.config as functorch_config
        from torch._inductor import compile_fx
        from torch._inductor import config as inductor_config
        from torch._inductor import metrics
        self._metrics = metrics
        self._stack.enter_context(inductor_config.patch(fx_graph_cache=False))
        self._stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        # Inductor counts a graph's bytes only while this log is on; with no
        # handler and no propagation its INFO records go nowhere
        log = compile_fx.inductor_metrics_log
        self._stack.callback(log.setLevel, log.level)
        log.setLevel(logging.INFO)
        torch._dynamo.reset()
        metrics.reset()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.total_bytes = int(self._metrics.num_bytes_accessed)
        self._stack.close()
        torch._dynamo.reset()
        if kind is None and self.total_bytes <= 0:
            raise RuntimeError(
                'Inductor counted no bytes: nothing was compiled inside the context, or '
                f'torch {torch.__version__} no longer reports torch._inductor.metrics.'
                'num_bytes_accessed')
