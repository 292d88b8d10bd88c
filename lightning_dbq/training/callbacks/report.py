"""DBQReport: at the end of fit, a per-bit table (rich), ``results.json``, a per-bit accuracy plot and the int artifact.

``results.json`` is a stable interface::

    {"bits": [8, 6, 4, 2], "val": {"w8a8": {"acc": 0.97}, ...}, "artifact": "<path>", "checkpoint": "<path>"}

(paths relative to the output directory; accuracy as a fraction).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_dbq.quant.artifact import save_int
from lightning_dbq.quant.artifact_check import ArtifactError
from lightning_dbq.search.figures import pyplot, save_figure
from lightning_dbq.training.state import bit_label, get_state

__all__ = ["DBQReport", "data_metadata", "plot_per_bit_accuracy"]

log = logging.getLogger(__name__)


def plot_per_bit_accuracy(history: list[dict[str, float]], final: dict[str, float], path: Path) -> Path:
    """Two panels: validation accuracy per bit over epochs, and the final accuracy per bit (bars)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(final)
    for label in labels:
        xs = [h["epoch"] for h in history if label in h]
        ys = [100 * h[label] for h in history if label in h]
        ax1.plot(xs, ys, marker="o", label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("val accuracy (%)")
    ax1.set_title("validation accuracy per bit-width")
    ax1.grid(alpha=0.3)
    ax1.legend()
    bars = ax2.bar(labels, [100 * final[k] for k in labels], color="tab:blue")
    ax2.bar_label(bars, fmt="%.1f")
    lo = min([100 * v for v in final.values()] + [100.0])
    ax2.set_ylim(max(0.0, lo - 10), 100)
    ax2.set_ylabel("val accuracy (%)")
    ax2.set_title("final accuracy, one stored int model")
    return save_figure(fig, path)


class DBQReport(Callback):
    """Writes the end-of-fit report into ``output_dir``.

    Args:
        output_dir: where ``results.json``, ``per_bit_accuracy.png`` and ``model.dbq.safetensors`` go.
        save_artifact: write the int artifact (``save_int``), with the ``preprocessing`` and ``class_names`` of
            ``trainer.datamodule`` when it has them (:func:`data_metadata`; none are guessed otherwise).
        plot: write the PNG (also logged to W&B when a ``WandbLogger`` is active).
    """

    def __init__(self, output_dir: str, save_artifact: bool = True, plot: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.save_artifact = save_artifact
        self.plot = plot
        self.history: list[dict[str, float]] = []

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_end runs after the module's on_validation_epoch_end has logged this epoch's metrics
        if trainer.sanity_checking:
            return
        row: dict[str, float] = {"epoch": float(trainer.current_epoch + 1)}
        for k, v in trainer.callback_metrics.items():
            if k.startswith("val/acc_w"):
                row[k[len("val/acc_") :]] = float(v)
        self.history.append(row)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    @rank_zero_only
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = get_state(pl_module)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        val = {bit_label(b): {"acc": metrics[f"val/acc_{bit_label(b)}"]} for b in state.bits
               if f"val/acc_{bit_label(b)}" in metrics}  # fmt: skip
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {"bits": list(state.bits), "val": val, "artifact": None, "checkpoint": None}
        ckpt = trainer.checkpoint_callback
        ckpt_path = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        if ckpt_path:
            results["checkpoint"] = os.path.relpath(ckpt_path, self.output_dir)
        if self.save_artifact:
            path = _save_artifact(state.model, self.output_dir / "model.dbq.safetensors", val, trainer)
            results["artifact"] = os.path.relpath(path, self.output_dir)
        if self.plot and val:
            final = {k: v["acc"] for k, v in val.items()}
            png = plot_per_bit_accuracy(self.history, final, self.output_dir / "per_bit_accuracy.png")
            results["plot"] = os.path.relpath(png, self.output_dir)
            _log_image(trainer, "per_bit_accuracy", png)
        (self.output_dir / "results.json").write_text(json.dumps(results, indent=2))
        _print_table(val, self.output_dir)


def data_metadata(datamodule: Any) -> dict[str, Any]:
    """``save_int``'s ``preprocessing`` / ``class_names`` from a data module that describes them.

    A property that is missing, not implemented or not available yet (``RuntimeError``, e.g. before ``setup``) is
    left out: nothing is guessed.

    Returns:
        A dict with the keys that could be read (possibly empty).
    """
    out: dict[str, Any] = {}
    if datamodule is None:
        return out
    for name in ("preprocessing", "class_names"):
        try:
            value = getattr(datamodule, name)
        except (AttributeError, NotImplementedError, RuntimeError) as e:
            log.info("DBQReport: the artifact records no %s (%s)", name, e)
            continue
        if value is not None:
            out[name] = value
    return out


def _save_artifact(model: Any, path: Path, val: dict[str, Any], trainer: pl.Trainer) -> Path:
    """``save_int`` with the data module's preprocessing and class names; without them (and a warning) when they do
    not fit the model (e.g. a class count that differs), so a finished training run always leaves its artifact."""
    meta = data_metadata(getattr(trainer, "datamodule", None))
    try:
        return save_int(model, path, extra={"val": val}, **meta)
    except ArtifactError as e:
        if not meta or not e.field.startswith(("preprocessing", "class_names")):
            raise
        rank_zero_warn(f"DBQReport: the data module's {e.field} does not fit the model ({e.problem}); the artifact "
                       "is written without preprocessing / class names")  # fmt: skip
        return save_int(model, path, extra={"val": val})


def _log_image(trainer: pl.Trainer, key: str, path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)])


def _print_table(val: dict[str, dict[str, float]], output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="val accuracy per bit-width")
    table.add_column("config")
    table.add_column("val acc", justify="right")
    for label, m in val.items():
        table.add_row(label, f"{100 * m['acc']:.2f} %")
    console = Console()
    console.print(table)
    console.print(f"outputs in {output_dir}")
