"""Lightning glue: the per-bit loop, bit-switch strategies, ALRS, DBQModule and callbacks.

Importing this package registers the strategies ``dbq``, ``dbq_ddp`` and ``dbq_ddp_spawn`` with Lightning.
"""

from lightning_dbq.training.alrs import alrs_factor, param_groups
from lightning_dbq.training.callbacks.dbq import DoubleRoundingQAT
from lightning_dbq.training.callbacks.report import DBQReport
from lightning_dbq.training.loop import run_bit_loop
from lightning_dbq.training.module import DBQModule
from lightning_dbq.training.state import BitLoopState
from lightning_dbq.training.strategy import BitSwitchDDPStrategy, BitSwitchSingleDeviceStrategy
from lightning_dbq.training.sync import TimmSyncBatchNorm

__all__ = [
    "BitLoopState",
    "BitSwitchDDPStrategy",
    "BitSwitchSingleDeviceStrategy",
    "DBQModule",
    "DBQReport",
    "DoubleRoundingQAT",
    "TimmSyncBatchNorm",
    "alrs_factor",
    "param_groups",
    "run_bit_loop",
]
