"""Deterministic tiny datasets in the real COCO, ADE20K and ImageNet formats.

They make the demos and tests run on a fresh machine with no data to download.
"""
