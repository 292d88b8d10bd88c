"""What ``dbq-eval`` measures: top-1 accuracy and per-batch latency of configurations in a runtime, plus outputs.

Runtimes are registered by name in :data:`lightning_dbq.search.options.RUNTIMES`; each is a factory
``fn(model, config, example_input, *, onnx_mode, threads, workdir, calibration) -> predict`` where
``predict(x) -> logits`` (CPU tensors):

* ``torch``: :func:`lightning_dbq.freeze` at the configuration, run under ``torch.inference_mode()``;
* ``onnx``: :func:`lightning_dbq.export.export_onnx` into ``workdir``, run by ONNX Runtime
  (``CPUExecutionProvider``, graph optimization ``ORT_ENABLE_ALL``, ``threads`` intra-op threads).

Pure torch/numpy (no Lightning, no Hydra).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "EvalRow",
    "accuracy",
    "cpu_name",
    "latency_ms",
    "onnx_runner",
    "plot_eval",
    "print_eval",
    "renormalize",
    "torch_runner",
]

Predict = Callable[[Tensor], Tensor]
Config = int | Mapping[str, int]


def _plain(config: Config) -> int | dict[str, int]:
    return dict(config) if isinstance(config, Mapping) else int(config)


def torch_runner(
    model: nn.Module,
    config: Config,
    example_input: Tensor,
    *,
    onnx_mode: str = "exact",
    threads: int = 1,
    workdir: str | os.PathLike[str] | None = None,
    calibration: Sequence[Tensor] | None = None,
) -> Predict:
    """``freeze(model, config)`` under ``torch.inference_mode()`` (threads: set by the caller, process-wide)."""
    from lightning_dbq.quant.convert import freeze

    frozen = freeze(model, _plain(config)).to(example_input.device)

    def predict(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return frozen(x)  # type: ignore[no-any-return]

    return predict


def onnx_runner(
    model: nn.Module,
    config: Config,
    example_input: Tensor,
    *,
    onnx_mode: str = "exact",
    threads: int = 1,
    workdir: str | os.PathLike[str] | None = None,
    calibration: Sequence[Tensor] | None = None,
) -> Predict:
    """Export ``config`` to ``workdir`` (``mode=onnx_mode``; ``calibration``: the preprocessed input batches the
    ``integer`` mode calibrates on) and run it in ONNX Runtime on the CPU.

    Raises:
        ImportError: ``onnx`` / ``onnxruntime`` are not installed (the ``onnx`` extra).
        NotImplementedError: an ONNX mode the exporter does not implement yet.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("runtime=onnx needs onnxruntime: pip install 'lightning-dbq[onnx]'") from e
    from lightning_dbq.search.serving import write_onnx

    folder = Path(workdir) if workdir is not None else Path.cwd()
    path = write_onnx(model, _plain(config), folder / f"dbq-eval-{uuid.uuid4().hex[:8]}.onnx",
                      example_input=example_input, onnx_mode=onnx_mode, calibration=calibration)  # fmt: skip
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def predict(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"input": x.detach().cpu().numpy()})[0])

    return predict


def renormalize(
    batches: Iterable[tuple[Tensor, Tensor]],
    from_mean: Sequence[float],
    from_std: Sequence[float],
    to_mean: Sequence[float],
    to_std: Sequence[float],
) -> list[tuple[Tensor, Tensor]]:
    """Batches normalised with ``(from_mean, from_std)`` re-normalised to ``(to_mean, to_std)`` (per channel)."""

    def col(v: Sequence[float]) -> Tensor:
        return torch.tensor([float(a) for a in v]).view(1, -1, 1, 1)

    fm, fs, tm, ts = col(from_mean), col(from_std), col(to_mean), col(to_std)
    return [(((x * fs + fm) - tm) / ts, y) for x, y in batches]


def accuracy(predict: Predict, batches: Iterable[tuple[Tensor, Tensor]], progress: Any = None) -> tuple[float, int]:
    """Top-1 accuracy of ``predict`` on ``batches`` and the number of images.

    Raises:
        ValueError: no images.
    """
    correct = total = 0
    for x, y in batches:
        correct += int((predict(x).argmax(dim=-1) == y).sum())
        total += int(y.numel())
        if progress is not None:
            progress(int(y.numel()))
    if total == 0:
        raise ValueError("accuracy(): no images in `batches`")
    return correct / total, total


def latency_ms(predict: Predict, x: Tensor, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall-clock milliseconds of ``predict(x)`` over ``repeats`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        predict(x)
        times.append(1000.0 * (time.perf_counter() - t0))
    return float(statistics.median(times))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@dataclass(frozen=True)
class EvalRow:
    """One evaluated configuration (an ``eval.json`` row).

    Attributes:
        name: ``w4a4`` or ``pareto[3]``.
        source: ``"uniform"``, ``"pareto"`` or ``"stored"``.
        avg_bits: parameter-weighted average bits.
        acc: top-1 accuracy (fraction).
        latency_ms: median milliseconds per batch of ``batch_size`` images.
        n_images: images behind ``acc``.
        config: the bit-width (uniform) or ``{layer: bits}``.
    """

    name: str
    source: str
    avg_bits: float
    acc: float
    latency_ms: float
    n_images: int
    config: int | dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


def plot_eval(rows: Sequence[EvalRow], path: str | os.PathLike[str], title: str = "") -> Path:
    """Accuracy vs average bits: uniform bit-widths (stars), pareto rows (line), a slim artifact's stored config."""
    from lightning_dbq.search.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    pareto = sorted((r for r in rows if r.source == "pareto"), key=lambda r: r.avg_bits)
    uniform = sorted((r for r in rows if r.source == "uniform"), key=lambda r: r.avg_bits)
    if pareto:
        ax.plot([r.avg_bits for r in pareto], [100 * r.acc for r in pareto], "o-", label="pareto.json rows")
    if uniform:
        ax.plot([r.avg_bits for r in uniform], [100 * r.acc for r in uniform], "k*", markersize=10,
                label="uniform w{b}a{b}")  # fmt: skip
    stored = [r for r in rows if r.source not in ("pareto", "uniform")]
    if stored:
        ax.plot([r.avg_bits for r in stored], [100 * r.acc for r in stored], "rD", label="stored configuration")
    ax.set_xlabel("average bits (parameter-weighted)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "accuracy / average bits")
    return save_figure(fig, path)


def print_eval(rows: Sequence[EvalRow], title: str, console: Any = None) -> None:
    """Rich table: config, average bits, accuracy, latency, images."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("config")
    for col in ("avg bits", "top-1", "ms / batch", "images"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.name, f"{r.avg_bits:.2f}", f"{100 * r.acc:.2f} %", f"{r.latency_ms:.2f}", str(r.n_images))
    (console or Console()).print(table)
