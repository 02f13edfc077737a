"""Batch-level preprocessing steps for the toolboxes' data preprocessors."""
from .bucket_pad import BucketPad, bucket_side

__all__ = ['BucketPad', 'bucket_side']
