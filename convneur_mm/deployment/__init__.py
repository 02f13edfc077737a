"""Deployment: ONNX export checked with ONNX Runtime (``tools/deployment``)."""
from .export import (DeployableModel, ExportCheckError, check_onnx, check_size_for,
                     export_onnx, memory_chunk_counts, onnx_outputs, ort_session)

__all__ = ['DeployableModel', 'ExportCheckError', 'check_onnx', 'check_size_for',
           'export_onnx', 'memory_chunk_counts', 'onnx_outputs', 'ort_session']
