"""Where a call's time goes: the self time of its profiler events, by category.

One categorization for every benchmark (the GEMM time of ``speed``, and the
lab's compiled and memory-paths profiles): convolutions,
matrix products, Inductor's compiled regions, mmcv ops, other ATen ops, and
the rest. Self times partition the profiled time, so the categories add up
to the call.
"""
import re
from typing import Callable, Dict, Optional

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from convneur_mm.analysis.timing import is_cuda, time_call

# Where the time goes: profiler events by name, the first matching pattern wins.
# Self times partition the profiled time: an op's self time excludes the ops
# it calls, so ``aten::conv2d`` -> ``aten::mkldnn_convolution`` counts once.
CONVOLUTIONS, MATRIX_PRODUCTS = 'convolutions', 'matrix products'
PROFILE_CATEGORIES = (
    (CONVOLUTIONS, r'^(aten|mkldnn)::\w*conv(olution|_transpose|_depthwise|\dd)'),
    (MATRIX_PRODUCTS, r'^aten::(mm|bmm|addmm|baddbmm|addbmm|addmv|mv|dot|matmul|linear|einsum'
                        r'|_addmm_activation|mkldnn_linear\w*|_?scaled_dot_product\w*'
                        r'|_flash_attention\w*|_efficient_attention\w*)$|^mkldnn::_linear|^mkl::'),
    # Inductor's compiled graphs: AOTAutograd's ``CompiledFunction`` (and its
    # backward) calls ``## Call CompiledFxGraph <hash> ##``, in which the fused
    # C++ (CPU) or Triton (CUDA) kernels run without events of their own: they
    # are its self time. The ATen ops a graph calls (oneDNN convolutions,
    # GEMMs) keep their own names and categories. Also Dynamo's guards.
    ('compiled regions (fused kernels)',
     r'CompiledFxGraph|^Torch-Compiled Region|CompiledFunction|^TorchDynamo|^AOTDispatcher'
     r'|^Pregraph|^cpp_fused|^triton_'),
    ('mmcv ops (RoIAlign, NMS)', r'^(RoIAlign|NMSop)|^mmcv::|^torchvision::'),
    ('other ATen ops (element-wise, reductions, copies)', r'^aten::'),
)
OTHER_EVENTS = 'other events (autograd engine, Python-level)'
OUTSIDE_EVENTS = 'in no event (Python between the ops)'


def profile_category(name: str) -> str:
    """The ``PROFILE_CATEGORIES`` entry (or ``OTHER_EVENTS``) of an event name."""
    return next((category for category, pattern in PROFILE_CATEGORIES
                 if re.search(pattern, name)), OTHER_EVENTS)


def time_breakdown(events, cuda: bool, wall: Optional[float] = None) -> Dict[str, float]:
    """Seconds of self time per category of ``events`` (``key_averages()``
    rows), host time on a CPU, device time on CUDA (where a kernel is counted
    in the self device time of the host op that launched it, so the kernels'
    own rows are skipped); with the ``wall`` time of the profiled call, also
    the time no event covers."""
    seconds = dict.fromkeys([c for c, _ in PROFILE_CATEGORIES] + [OTHER_EVENTS], 0.0)
    for event in events:
        if cuda and event.device_type != DeviceType.CPU:
            continue
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        seconds[profile_category(event.key)] += self_us / 1e6
    if wall is not None:
        seconds[OUTSIDE_EVENTS] = wall - sum(seconds.values())
    return seconds


def profile_call(call: Callable, device: str, rows: int = 0) -> Dict[str, float]:
    """``time_breakdown`` of one call of ``call``, profiled."""
    cuda = is_cuda(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = time_call(call, device)
    events = prof.key_averages()
    if rows:
        print(events.table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total',
                           row_limit=rows, max_name_column_width=70))
    return time_breakdown(events, cuda, None if cuda else wall)
