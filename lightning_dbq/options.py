"""The allowed values of every enumerated option, in one torch-free module.

The library modules import their tuples from here, and the command-line validation (which must fail in a few
seconds, before torch is imported) reads the same tuples.
"""

from __future__ import annotations

__all__ = [
    "ALGORITHMS",
    "ALRS_MODES",
    "DEFAULT_KERNEL",
    "KERNELS",
    "MAX_BITS",
    "MIN_BITS",
    "NONFINITE",
    "OPTIMIZERS",
    "SCHEDULERS",
    "WEIGHT_MODES",
]

MIN_BITS = 2
MAX_BITS = 8
WEIGHT_MODES = ("double_round", "floor", "unshared", "binary")
KERNELS = ("fused", "eager", "compile", "auto")
DEFAULT_KERNEL = "auto"  # compile where a probe works on the input's device, else fused (logged)
ALGORITHMS = ("A2", "A1")
ALRS_MODES = ("paper", "eq6", "off")
NONFINITE = ("stop", "skip")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "onecycle", "none")
