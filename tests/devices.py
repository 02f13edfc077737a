"""The devices a twin test runs on: the CPU always, CUDA marked ``gpu`` (run
by ``make test-gpu``, skipped with the reason where no GPU is visible).

A test that checks one behaviour on both takes a ``device`` argument::

    @pytest.mark.parametrize('device', DEVICES)
    def test_x(device): ...

so that its GPU case is collected, renamed and changed with it.

The GPU cases (``make test-gpu``; ``pytest --collect-only -q -m gpu tests``
lists them) cover, on CUDA: the neural memory against the float64 reference;
GRN's spatial norm; the stem's and the input projections' gradients under fp16
and bf16 autocast; ``torch.compile`` against eager (float32 and fp16 autocast,
and in evaluation at six sizes); a model cast with ``.half()`` /
``.bfloat16()`` and FSDP2's mixed precision; the attention mixers in
deterministic mode; mmcv RoIAlign on the backbone's outputs; a training step of
the real Cascade Mask R-CNN M3 config under fp16 ``--amp`` (the loss scale must
settle at 2^10 or more); exact resume; and 2 NCCL processes x 1 image against
1 GPU x 2 images. Their tolerances are the CPU runs' (TF32 off).
"""
import pytest

CUDA = pytest.param('cuda', marks=pytest.mark.gpu, id='cuda')
DEVICES = ['cpu', CUDA]


def on_cuda(*values, id: str = None):  # noqa: A002 (pytest's name)
    """One parameter set of a test's CUDA case, marked ``gpu``."""
    return pytest.param(*values, marks=pytest.mark.gpu, id=id)
