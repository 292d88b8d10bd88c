"""HASB: Hessian-aware stochastic bit switching for mixed-precision SuperNet training (paper Algorithm A.3).

Every batch still trains one pass per candidate bit ``b`` (highest first); in pass ``i`` each layer keeps ``b``
except with probability ``σ_e = σ_0·(e+1)/E`` it switches to a roulette draw (sensitive layers, by Hessian trace,
favour high bits; insensitive ones sample uniformly). Draws are seeded by ``(seed, global_step, pass index)`` so
DDP ranks and resumed runs agree. ``uniform=True`` is the baseline (every layer samples uniformly).

Norms should be transitional (``quant.prepare.transitional_norm=true``); at the first HASB epoch every
``(p, b)`` norm is initialised from the uniform ``(b, b)`` one, so a multi-precision warm-up (``warmup_epochs``) or a
multi-precision checkpoint carries over.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_dbq.quant.norm import TransitionalNorm
from lightning_dbq.quant.prepare import quantized_layers
from lightning_dbq.search.profile import load_traces
from lightning_dbq.search.sampling import HASBSampler, sensitive_layers, switch_probability
from lightning_dbq.training.callbacks.hessian import find_hessian_callback
from lightning_dbq.training.state import BitConfig, get_state

__all__ = ["HASB"]


class HASB(Callback):
    """Mixed-precision SuperNet training with Hessian-aware stochastic bit switching.

    Args:
        sigma0: final switch probability σ_0 (σ_e ramps linearly to it over the HASB epochs).
        threshold: ``"mean"`` or ``"topk"`` (with ``top_k``) sensitivity threshold.
        uniform: baseline: uniform sampling for every layer (no traces needed).
        seed: sampler seed.
        warmup_epochs: multi-precision (uniform-bit) epochs before switching starts.
        traces_path: traces file (default: the trainer's :class:`HessianTraces` callback).
    """

    def __init__(
        self,
        sigma0: float = 0.5,
        threshold: str = "mean",
        top_k: int | None = None,
        uniform: bool = False,
        seed: int = 0,
        warmup_epochs: int = 0,
        traces_path: str | None = None,
    ) -> None:
        if not 0.0 <= sigma0 <= 1.0:
            raise ValueError(f"sigma0 must be in [0, 1], got {sigma0}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.sigma0, self.threshold, self.top_k, self.uniform = sigma0, threshold, top_k, uniform
        self.seed, self.warmup_epochs, self.traces_path = seed, warmup_epochs, traces_path
        self.sampler: HASBSampler | None = None
        self.norms_initialised = False
        self._trainer: pl.Trainer | None = None
        self.switched = 0
        self.draws = 0

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> HASBSampler:
        state = get_state(pl_module)
        layers = [i.name for i in quantized_layers(state.model)]
        if self.uniform:
            return HASBSampler(layers, state.bits, None, seed=self.seed, uniform=True)
        if self.traces_path:
            traces = load_traces(self.traces_path, layers)
        else:
            cb = find_hessian_callback(trainer)
            if cb is None:
                raise RuntimeError("HASB needs per-layer traces: add the HessianTraces callback, pass traces_path=, "
                                   "or use uniform=True")  # fmt: skip
            traces = cb.ensure(trainer, pl_module)
        values = [traces[n].normalized for n in layers]
        sensitive = sensitive_layers(values, mode=self.threshold, top_k=self.top_k)
        return HASBSampler(layers, state.bits, sensitive, seed=self.seed)

    def sigma(self, epoch: int, max_epochs: int) -> float:
        """σ_e for the HASB epoch ``epoch - warmup_epochs`` (0 during warm-up)."""
        e = epoch - self.warmup_epochs
        if e < 0:
            return 0.0
        return switch_probability(self.sigma0, e, max(max_epochs - self.warmup_epochs, 1))

    def _sample(self, global_step: int, index: int, bits: int) -> BitConfig:
        assert self.sampler is not None and self._trainer is not None
        sigma = self.sigma(self._trainer.current_epoch, int(self._trainer.max_epochs or 1))
        if sigma == 0.0:
            return bits
        current = dict.fromkeys(self.sampler.layers, bits)
        config = self.sampler.sample(current, global_step, index, sigma)
        self.switched += sum(1 for n, b in config.items() if b != bits)
        self.draws += len(config)
        return config

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.warmup_epochs:
            return
        if self.sampler is None:  # traces (if computed on demand) now describe the warmed-up network
            self.sampler = self._build(trainer, pl_module)
        get_state(pl_module).sampler = self._sample
        if not self.norms_initialised:
            for m in get_state(pl_module).model.modules():
                if isinstance(m, TransitionalNorm):
                    m.copy_diagonal_to_all()
            self.norms_initialised = True
        self.switched = self.draws = 0

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sigma = self.sigma(trainer.current_epoch, int(trainer.max_epochs or 1))
        pl_module.log("hasb/sigma", sigma)
        pl_module.log("hasb/switch_rate", self.switched / max(self.draws, 1))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        get_state(pl_module).sampler = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict() if self.sampler else None,
                "norms_initialised": self.norms_initialised}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sampler"):
            self.sampler = HASBSampler.from_state_dict(state_dict["sampler"])
        self.norms_initialised = bool(state_dict.get("norms_initialised", False))
