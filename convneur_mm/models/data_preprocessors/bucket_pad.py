"""Pad a detection batch up to one of a few sizes, so that ``--compile`` meets
few input shapes.

A compiled backbone and FPN compile once per input shape, up to
``torch._dynamo.config.recompile_limit`` (8), and run eager for every other
shape. COCO's keep-ratio resize to 1333x800 and padding to a multiple of 32
give 19 to 83 distinct batch shapes (docs/notes/investigations.md), so most batches would run
eager. Padding each side up to the next of a few bucket sizes bounds the
count: with buckets (800, 1088, 1344), 3 to 5 shapes for COCO's aspect
ratios. The price is padding: more pixels per batch, and zero tokens that
the global memory reads as context (as it reads mmdet's own padding).
"""
from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn

from convneur_mm.registry import MODELS


def bucket_side(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``size``; a size above every bucket
    stays as it is (it costs a shape of its own, never a crop)."""
    return next((b for b in sorted(buckets) if b >= size), size)


@MODELS.register_module()
class BucketPad(nn.Module):
    """A batch augment of MMDetection's ``DetDataPreprocessor``
    (``batch_augments``): pads the images, and with them the instance masks
    and semantic maps, to ``(bucket_side(H), bucket_side(W))``, and updates
    ``batch_input_shape`` / ``pad_shape``. mmdet applies batch augments in
    training only: validation and testing keep their own shapes.

    Args:
        buckets: side lengths to pad to, e.g. ``(800, 1088, 1344)``.
        pad_mask, pad_seg, img_pad_value, mask_pad_value, seg_pad_value:
            as mmdet's ``BatchFixedSizePad``, which does the padding.
    """

    def __init__(self, buckets: Sequence[int], pad_mask: bool = True, pad_seg: bool = False,
                 img_pad_value: int = 0, mask_pad_value: int = 0,
                 seg_pad_value: int = 255) -> None:
        super().__init__()
        if not buckets or any(isinstance(b, bool) or int(b) != b or b <= 0 for b in buckets):
            raise ValueError(f'buckets must be positive integers, got {buckets!r}')
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.pad_kwargs = dict(pad_mask=pad_mask, pad_seg=pad_seg, img_pad_value=img_pad_value,
                               mask_pad_value=mask_pad_value, seg_pad_value=seg_pad_value)

    def target_shape(self, height: int, width: int) -> Tuple[int, int]:
        return bucket_side(height, self.buckets), bucket_side(width, self.buckets)

    def forward(self, inputs: Tensor, data_samples: Optional[List] = None
                ) -> Tuple[Tensor, Optional[List]]:
        from mmdet.models.data_preprocessors import BatchFixedSizePad  # a toolbox, lazily
        size = self.target_shape(*inputs.shape[-2:])
        return BatchFixedSizePad(size, **self.pad_kwargs)(inputs, data_samples)
