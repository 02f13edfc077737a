"""ConvNeur-M3's ImageNet classifier and its local-only network, as the
memory benchmarks build and call them: the models, the inputs their global
branches get, batch-1 latency replayed from a CUDA graph and Dynamo's graph
breaks.
"""
from typing import Callable, Dict, List, Optional

import torch

from convneur_mm.analysis.timing import time_calls
from benchmarks.common.subjects import (describe_error, median_ms, precision,
                                                  relative_error)

M3_CONFIG = 'cls_convneur_m3_300e_in1k.py'
LOCAL_ONLY = {'model.backbone.memory_placement': 'none'}


def build_classifier(device: str, chunk_size: Optional[int] = None,
                     options: Optional[Dict] = None) -> torch.nn.Module:
    """ConvNeur-M3's ImageNet classifier from its config, with the memory's
    ``chunk_size`` and config ``options`` overriding, on ``device`` in eval mode."""
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    cfg = load_config(M3_CONFIG)
    if chunk_size:
        cfg.merge_from_dict({'model.backbone.memory_cfg.chunk_size': chunk_size})
    if options:
        cfg.merge_from_dict(options)
    return build_model(cfg, init=True).to(device).eval()


def logits_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> logits of a toolbox classifier."""
    return lambda x: model(x, mode='tensor')


def global_branches(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The model's ``GlobalBranch`` modules, in order."""
    from convneur_mm.models.layers.global_branch import GlobalBranch
    return [m for m in model.modules() if isinstance(m, GlobalBranch)]


def hooked_inputs(model: torch.nn.Module, x: torch.Tensor,
                  modules: List[torch.nn.Module]) -> List[torch.Tensor]:
    """The input each of ``modules`` gets in one forward of ``model`` on ``x``."""
    got: Dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: got.setdefault(id(mod), args[0]))
             for m in modules]
    try:
        with torch.no_grad():
            logits_fn(model)(x)
    finally:
        for h in hooks:
            h.remove()
    return [got[id(m)] for m in modules]


def graph_latency(forward: Callable[[], torch.Tensor], iters: int, warmup: int,
                  device: str = 'cuda') -> Dict:
    """Batch-1 latency of ``forward`` (no arguments; inference): plain calls,
    and replays of a ``torch.cuda.CUDAGraph`` captured from it, with the
    graph's output against the eager one. Autocast inside ``forward`` must
    run with ``cache_enabled=False``: cached casts would be freed after the
    capture while the graph still reads them."""
    eager = time_calls(forward, iters, device, warmup=warmup)
    want = forward()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture wants
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = forward()
    graph.replay()
    torch.cuda.synchronize()
    replay = time_calls(graph.replay, iters, device, warmup=warmup)
    return dict(status='ok', eager_ms=median_ms(eager), graph_ms=median_ms(replay),
                graph_error_vs_eager=relative_error([got.float()], [want.float()]))


def graph_breaks(backbone: torch.nn.Module, x: torch.Tensor, context: Optional[str],
                 device: str) -> Dict:
    """``torch._dynamo.explain`` of ``backbone`` on ``x`` under the
    ``precision`` context: the number of graph breaks and their first reasons
    (a break costs a graph per block)."""
    try:
        with torch.inference_mode(), precision(context, device):
            explanation = torch._dynamo.explain(backbone)(x)
    except Exception as exc:  # noqa: BLE001
        return dict(status=describe_error(exc))
    finally:
        torch._dynamo.reset()
    return dict(status='ok', count=explanation.graph_break_count,
                reasons=[str(r.reason)[:300] for r in explanation.break_reasons[:3]])
