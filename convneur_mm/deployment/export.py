"""ONNX export of ConvNeur models, checked against PyTorch with ONNX Runtime.

What is exported: a classifier (logits), a backbone alone (its stage maps),
or a Semantic FPN / UperNet segmentor (the decode head's logits at 1/4 of the
input size), each with the config's normalization inside the graph. The graph
takes ``images``: float32 (N, 3, H, W) pixel values in 0..255, in the channel
order the config's pipeline loads (BGR, as ``cv2.imread`` gives them); it
swaps to RGB where the config does, subtracts the mean and divides by the
std. Resizing, cropping and padding stay outside (``PREPROCESSING``).

The graph is traced with ``torch.export`` and converted by PyTorch's ONNX
exporter. The neural memory's write path is its closed-form gradient
(including ATen's ``gelu_backward``): what makes an export correct is not
that it runs but that ONNX Runtime computes what PyTorch does, which
``check_onnx`` measures on given inputs. With ``dynamic=True`` height and
width are symbolic: under ``torch.export`` the memory builds one graph for
every number of chunks (``MemoryPlan.shape_generic``), and the backbone pads
every stage input (maybe by zero), so the graph holds no branch taken for
the traced size; the check then also runs a size with other chunk counts.
Two toolbox modules compute sizes in Python, which tracing would freeze into
constants of the traced size; while tracing (only), ``shape_generic_patches``
gives them the same computation in symbolic form: MMSegmentation's
``Upsample`` (S-FPN's head: ``int(size * 2.0)``) and ``nn.AdaptiveAvgPool2d``
(UperNet's pyramid pooling: its bins, whose ONNX form otherwise gathers fixed
indices).
Detectors are not exported: their RoI heads select proposals by score, NMS
and per-image loops over mmcv ops, which need mmdeploy's rewrites.
"""
from contextlib import ExitStack, contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.backbones.convneur import ConvNeur
from ..models.layers.neural_memory import NeuralMemory
from convneur_mm.models.utils.shapes import ceil_div

PARTS = ('model', 'backbone')
SUPPORTED_SCOPES = ('mmpretrain', 'mmseg')
PREPROCESSING = {
    'mmpretrain': 'resize the short side to 256 (bicubic) and centre-crop 224x224, as '
                  'the test pipeline does; output: logits, softmax for probabilities',
    'mmseg': 'resize to fit 2048x512 keeping the aspect ratio, as the test pipeline '
             'does (any size works); output: logits at 1/4 of the input size, upsample '
             'them bilinearly (align_corners=False) to the image size and take argmax',
    'backbone': 'output: the normalized stage maps (N, C_i, ceil(H / 2^(i+2)), '
                'ceil(W / 2^(i+2))) of the configured out_indices',
}


class ExportCheckError(RuntimeError):
    """ONNX Runtime does not reproduce PyTorch's outputs within tolerance."""


class DeployableModel(nn.Module):
    """Raw images -> network outputs, normalization included.

    Args:
        model: a toolbox model built from one of our configs.
        part: 'model' (the whole network) or 'backbone'.
        scope: the config's ``default_scope``.
    """

    def __init__(self, model: nn.Module, part: str, scope: str):
        super().__init__()
        if part not in PARTS:
            raise ValueError(f'part must be one of {PARTS}, got {part!r}')
        if part == 'model' and scope not in SUPPORTED_SCOPES:
            raise ValueError(
                f'exporting a whole {scope} model is not supported (only {SUPPORTED_SCOPES}); '
                'detectors\' RoI heads (proposal selection, NMS, per-image loops) need '
                'mmdeploy. Export the backbone with --backbone-only.')
        self.part, self.scope = part, scope
        self.net = model.backbone if part == 'backbone' else model
        pre = model.data_preprocessor
        # MMPretrain's classifiers say to_rgb, MMEngine _channel_conversion,
        # MMSegmentation channel_conversion
        self.swap_rgb = any(bool(getattr(pre, name, False)) for name in
                            ('to_rgb', '_channel_conversion', 'channel_conversion'))
        normalize = getattr(pre, '_enable_normalize', False)
        mean = pre.mean if normalize else None
        std = pre.std if normalize else None
        self.register_buffer('mean', (mean if mean is not None else torch.zeros(3, 1, 1))
                             .detach().clone().float().reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', (std if std is not None else torch.ones(3, 1, 1))
                             .detach().clone().float().reshape(1, 3, 1, 1), persistent=False)

    def output_names(self) -> List[str]:
        if self.part == 'backbone':
            return [f'stage{i}' for i in self.net.out_indices]
        return ['logits'] if self.scope == 'mmpretrain' else ['seg_logits']

    def preprocessing(self) -> str:
        order = 'BGR (swapped to RGB inside)' if self.swap_rgb else 'as loaded'
        return (f'input "images": float32 (N, 3, H, W), pixel values 0..255, channels {order}; '
                f'normalized inside: mean {self.mean.flatten().tolist()}, std '
                f'{self.std.flatten().tolist()}. Outside the graph: '
                + PREPROCESSING['backbone' if self.part == 'backbone' else self.scope])

    def forward(self, images: Tensor):
        x = images.flip(1) if self.swap_rgb else images
        x = (x - self.mean) / self.std
        if self.part == 'backbone':
            return tuple(self.net(x))
        return self.net(x, mode='tensor')


def _upsample_forward(self, x: Tensor) -> Tensor:
    """MMSegmentation's ``Upsample.forward`` with an integral scale factor
    computed in integers: the same sizes, kept symbolic."""
    from mmseg.models.utils import resize
    scale = self.scale_factor
    if self.size or float(scale) != int(scale):
        return _ORIGINAL['Upsample'](self, x)
    size = [t * int(scale) for t in x.shape[-2:]]
    return resize(x, size, None, self.mode, self.align_corners)


def adaptive_avg_pool2d(x: Tensor, output_size) -> Tensor:
    """``F.adaptive_avg_pool2d`` from box sums of the integral image: bin i of
    o over n inputs averages [floor(i n / o), ceil((i + 1) n / o)), with the
    bin edges computed from the (symbolic) input size in the graph."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    h, w = x.shape[-2:]
    out_h, out_w = out_h or h, out_w or w
    integral = F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))

    def edges(n, o):
        i = torch.arange(o, device=x.device)
        return (i * n).div(o, rounding_mode='floor'), ((i + 1) * n + o - 1).div(
            o, rounding_mode='floor')

    (top, bottom), (left, right) = edges(h, out_h), edges(w, out_w)

    def corner(rows: Tensor, cols: Tensor) -> Tensor:
        return integral[..., rows[:, None], cols[None, :]]

    sums = (corner(bottom, right) - corner(top, right) - corner(bottom, left)
            + corner(top, left))
    area = ((bottom - top)[:, None] * (right - left)[None, :]).to(x.dtype)
    return sums / area


def _adaptive_pool_forward(self, x: Tensor) -> Tensor:
    return adaptive_avg_pool2d(x, self.output_size)


_ORIGINAL: Dict[str, object] = {}


@contextmanager
def shape_generic_patches() -> Iterator[None]:
    """While tracing for export: the toolbox modules that compute sizes in
    Python compute them symbolically (see the module docstring)."""
    patches = [(nn.AdaptiveAvgPool2d, 'AdaptiveAvgPool2d', _adaptive_pool_forward)]
    try:
        from mmseg.models.utils import Upsample
        patches.append((Upsample, 'Upsample', _upsample_forward))
    except ImportError:
        pass
    with ExitStack() as stack:
        for cls, name, forward in patches:
            _ORIGINAL[name] = cls.forward
            stack.callback(setattr, cls, 'forward', cls.forward)
            cls.forward = forward
        yield


def export_onnx(module: nn.Module, example: Tensor, path: str,
                dynamic_dims: Sequence[int] = (), output_names: Sequence[str] = ('output',),
                input_name: str = 'images', opset: Optional[int] = None) -> None:
    """Trace ``module`` on ``example`` with torch.export and write ONNX to ``path``.

    ``dynamic_dims``: the input dimensions left symbolic (height and width:
    (2, 3)); the others keep the example's size. Backed sizes are treated
    size-obliviously while tracing, so that checks such as "is this derived
    size 1?" (0/1 specialization) do not become guards that tie the graph to
    the traced size; ``check_onnx`` at another size is what shows that the
    graph holds.
    """
    import torch.fx.experimental._config as fx_config
    from torch.export import Dim
    shapes = ({d: Dim.DYNAMIC for d in dynamic_dims},) if dynamic_dims else None
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=bool(dynamic_dims)), \
            shape_generic_patches():
        program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    onnx_program = torch.onnx.export(program, (example,), input_names=[input_name],
                                     output_names=list(output_names), opset_version=opset,
                                     dynamo=True, external_data=False)
    onnx_program.save(path)


def ort_session(path: str, threads: Optional[int] = None, spinning: bool = True):
    """An ONNX Runtime CPU session of the file (``threads``: intra-op threads,
    default ONNX Runtime's choice).

    ``spinning=False`` stops the intra-op threads from busy-waiting for
    work after each run (ONNX Runtime's default lets them spin for tens of
    milliseconds): on a machine where PyTorch runs next, the spinning
    threads slow its next call down
    (docs/notes/investigations.md#smaller-decisions-in-the-tools)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def onnx_outputs(path_or_session, inputs: Tensor) -> List[Tensor]:
    """Run the ONNX file (one input) with ONNX Runtime on the CPU."""
    session = (ort_session(path_or_session) if isinstance(path_or_session, str)
               else path_or_session)
    name = session.get_inputs()[0].name
    return [torch.from_numpy(o) for o in session.run(None, {name: inputs.numpy()})]


def check_onnx(path: str, module: nn.Module, inputs: Sequence[Tensor],
               atol: float = 1e-4) -> List[Dict]:
    """Largest absolute difference between ONNX Runtime and PyTorch per input.

    Raises ``ExportCheckError`` if an output's shape differs or any
    difference exceeds ``atol`` (or is not finite).
    """
    results = []
    for images in inputs:
        with torch.no_grad():
            expected = module(images)
        expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
        try:
            got = onnx_outputs(path, images)
        except Exception as error:  # ONNX Runtime's own errors (e.g. a fixed index)
            raise ExportCheckError(f'ONNX Runtime fails at input {tuple(images.shape)}: '
                                   f'{error}') from error
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in expected]:
            raise ExportCheckError(
                f'ONNX Runtime output shapes {[tuple(t.shape) for t in got]} differ from '
                f'PyTorch\'s {[tuple(t.shape) for t in expected]} at input '
                f'{tuple(images.shape)}')
        diff = max((g - e.float()).abs().max().item() for g, e in zip(got, expected))
        scale = max(e.abs().max().item() for e in expected)
        results.append(dict(shape=tuple(images.shape), max_abs_diff=diff, max_abs_output=scale))
        if not diff <= atol:
            raise ExportCheckError(
                f'ONNX Runtime differs from PyTorch by {diff:.3g} (> {atol:g}) at input '
                f'{tuple(images.shape)} (largest output magnitude {scale:.3g})')
    return results


def memory_chunk_counts(backbone: nn.Module, size: Tuple[int, int]) -> List[int]:
    """Chunks per neural memory of a ConvNeur backbone at input ``size`` (H, W)."""
    if not isinstance(backbone, ConvNeur):
        return []
    counts = []
    h, w = size
    for i, stage in enumerate(backbone.stages):
        stride = 4 * 2 ** i
        tokens = ceil_div(h, stride) * ceil_div(w, stride)
        counts += [ceil_div(tokens, m.chunk_size) for m in stage.modules()
                   if isinstance(m, NeuralMemory)]
    return counts


def check_size_for(backbone: nn.Module, size: Tuple[int, int]) -> Tuple[int, int]:
    """A second size for checking a dynamic export: larger by half in height
    and by a quarter in width, off the stride grid (odd), so that the stage
    padding works and some memory gets another number of chunks."""
    h, w = size
    other = (h + h // 2 + 3, w + w // 4 + 5)
    if memory_chunk_counts(backbone, other) == memory_chunk_counts(backbone, size) != []:
        raise ValueError(f'no memory changes its number of chunks between {size} and {other}')
    return other
