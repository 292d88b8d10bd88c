"""Allowed values of the gradient-quantization (FQT) options, torch-free.

:mod:`lightning_dbq.fqt.config` and the command-line validation (:mod:`lightning_dbq.cli.schema`, which must fail
in seconds, before torch is imported) read these tuples; :data:`lightning_dbq.fqt.grad_quant.GRAD_METHODS` registers
one estimator per name (a test keeps the two in step).
"""

from __future__ import annotations

__all__ = ["GRAD_METHOD_NAMES", "MAX_GRAD_BITS", "MIN_GRAD_BITS", "PRUNING_METHODS"]

MIN_GRAD_BITS = 1
MAX_GRAD_BITS = 16
#: ptq: one group per tensor | psq: per-sample (gX) / per-channel (gW) groups | bhq: block Householder + per-row
#: groups | agp: unbiased Bernoulli group pruning (p ∝ range, 1/p rescale) | topk: the public code's biased top-K
GRAD_METHOD_NAMES = ("ptq", "psq", "bhq", "agp", "topk")
#: methods that read ``keep`` (the others need ``keep == 1``)
PRUNING_METHODS = ("agp", "topk")
