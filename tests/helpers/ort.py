"""One ONNX Runtime session helper for the export tests (CPU provider, one thread, quiet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ort_session"]


def ort_session(path: Path | bytes, optimized: Path | None = None, level: str = "all") -> Any:
    """An ``InferenceSession`` of the model at ``path`` (or its bytes); ``optimized``: where ORT writes the model it
    actually runs; ``level``: ``"all"`` (every graph optimisation) or ``"none"``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path) if isinstance(path, Path) else path, so, providers=["CPUExecutionProvider"])
