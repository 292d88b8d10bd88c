"""Callbacks: drop-in QAT, Hessian profiling, HASB, post-fit SubNet search, and the per-bit report."""

from lightning_dbq.training.callbacks.dbq import DoubleRoundingQAT
from lightning_dbq.training.callbacks.hasb import HASB
from lightning_dbq.training.callbacks.hessian import HessianTraces
from lightning_dbq.training.callbacks.report import DBQReport
from lightning_dbq.training.callbacks.search import SubNetSearch

__all__ = ["HASB", "DBQReport", "DoubleRoundingQAT", "HessianTraces", "SubNetSearch"]
