"""``dbq-eval``: accuracy and latency of a trained model at every uniform bit-width and every pareto.json row.

``dbq-eval checkpoint=PATH data=cifar10 [pareto=pareto.json] [runtime=torch|onnx] [onnx_mode=exact|integer]
[bits=[8,4]]`` evaluates on the data's test split when it has a separate one (cifar10's official test batches,
``data=imagefolder data.test_root=DIR``), else on its validation split (digits, synthetic; ``eval.json`` says which).
Every configuration is frozen (``runtime=torch``) or exported to a temporary ONNX file and run by ONNX Runtime
(``runtime=onnx``: CPUExecutionProvider, graph optimization ALL, ``cpu_threads`` threads). Latency is the median
milliseconds per batch of ``latency.batch_size`` images over ``latency.batches`` timed runs after
``latency.warmup`` untimed ones.

Writes ``<hydra run dir>/eval.json`` (device, runtime, split, preprocessing, class names, rows of ``name, avg_bits,
acc, latency_ms, n_images``), ``eval.png`` (accuracy vs average bits) and prints a Rich table. An artifact's
recorded preprocessing is used; when the data config normalises differently, a warning names both and the data's
batches are re-normalised to the artifact's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.schema import check_eval_config
from lightning_dbq.cli.validate import ConfigError

__all__ = ["main", "run_eval"]

log = logging.getLogger("lightning_dbq.cli.eval")


def _split(dm: Any, max_images: int | None) -> tuple[str, list[Any]]:
    """``("test" | "val", batches)``: the test split when the data module has a separate one."""
    dm.setup()
    separate = getattr(dm, "test_set", None) is not None and dm.test_set is not getattr(dm, "val_set", None)
    loader = dm.test_dataloader() if separate else dm.val_dataloader()
    batches, seen = [], 0
    for x, y in loader:
        if max_images is not None and seen + len(y) > max_images:
            x, y = x[: max_images - seen], y[: max_images - seen]
        batches.append((x, y))
        seen += len(y)
        if max_images is not None and seen >= max_images:
            break
    return ("test" if separate else "val"), batches


def _check_shapes(model: Any, dm: Any, artifact_pp: dict[str, Any] | None, x: Any) -> None:
    """The data's images and classes must fit the model (ConfigError naming the data key)."""
    import torch

    if artifact_pp is not None:
        for key, name in (("image_size", "image_size"), ("in_chans", "channels")):
            have, want = int(getattr(dm, key)), int(artifact_pp[name])
            if have != want:
                raise ConfigError(f"data.{key}: the data gives {have}, the artifact expects {want} "
                                  f"(preprocessing.{name}); set data.{key}={want}")  # fmt: skip
    with torch.no_grad():
        classes = int(model(x[:1]).shape[-1])
    if classes != int(dm.num_classes):
        raise ConfigError(f"data: {type(dm).__name__} has {dm.num_classes} classes but the model outputs {classes}")


def _preprocess(model: Any, dm: Any, batches: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Apply the artifact's normalisation when it has one; warn loudly (naming both) when the data's differs."""
    from lightning_dbq.search.serving import align_normalization, data_preprocessing

    out, record, warning = align_normalization(batches, getattr(model, "dbq_preprocessing", None),
                                               data_preprocessing(dm))  # fmt: skip
    if warning:
        warn_loudly(warning)
    return out, record


def warn_loudly(message: str) -> None:
    """A warning in the log and in bold red on stderr."""
    from rich.console import Console

    log.warning(message)
    Console(stderr=True).print(f"[bold red]WARNING[/] {message}")


def _configs(cfg: DictConfig, model: Any) -> list[Any]:
    from lightning_dbq.search.configs import pareto_configs, stored_config, uniform_configs

    value: Any = cfg.get("bits")
    bits = None if value is None else [int(value)] if isinstance(value, int) else [int(b) for b in list(value)]
    try:
        configs = uniform_configs(model, bits)
    except ValueError as e:
        raise ConfigError(f"bits: {e}") from e
    stored = stored_config(model)
    if bits is None and stored is not None and len(set(stored.config.values())) > 1:  # type: ignore[union-attr]
        configs.append(stored)  # a mixed one-configuration slim artifact: no uniform bit-width, its configuration
    if cfg.get("pareto"):
        try:
            configs += pareto_configs(model, str(cfg.pareto))
        except ValueError as e:
            raise ConfigError(f"pareto: {e}") from e
    if not configs:
        raise ConfigError("bits: the model runs at no uniform bit-width (a slim artifact); give pareto=PATH")
    return configs


def _latency_batch(batches: list[Any], size: int) -> Any:
    import torch

    x = torch.cat([b[0] for b in batches])
    while len(x) < size:
        x = torch.cat([x, x])
    return x[:size].contiguous()


def run_eval(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """Evaluate the configurations ``cfg`` selects; writes ``eval.json`` / ``eval.png``, returns the eval.json dict.

    Raises:
        ConfigError: naming the field (``checkpoint``, ``bits``, ``pareto``, ``runtime``, ``onnx_mode``,
            ``data.*``).
    """
    check_eval_config(cfg)
    import tempfile

    import torch
    from tqdm.auto import tqdm

    from lightning_dbq.cli.search import load_model
    from lightning_dbq.search.bench import EvalRow, accuracy, cpu_name, latency_ms, plot_eval, print_eval
    from lightning_dbq.search.options import RUNTIMES, resolve

    threads = int(cfg.get("cpu_threads") or torch.get_num_threads())
    torch.set_num_threads(threads)
    runtime = str(cfg.runtime)
    factory = resolve(RUNTIMES, runtime, "runtime")
    model = load_model(str(cfg.checkpoint)).eval()
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    split, batches = _split(dm, cfg.get("max_images"))
    if split == "val":
        log.info("dbq-eval: %s has no separate test split; evaluating on its validation split", type(dm).__name__)
    _check_shapes(model, dm, getattr(model, "dbq_preprocessing", None), batches[0][0])
    batches, pp = _preprocess(model, dm, batches)
    configs = _configs(cfg, model)
    lat = cfg.latency
    x_lat = _latency_batch(batches, int(lat.batch_size))
    calibration = None
    if runtime == "onnx" and str(cfg.onnx_mode) == "integer":
        from lightning_dbq.search.serving import calibration_inputs

        calibration = calibration_inputs(dm, getattr(model, "dbq_preprocessing", None), int(cfg.calibration_images))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dbq-eval-") as work:
        for nc in tqdm(configs, desc=f"dbq-eval ({runtime}, {split} split)"):
            try:
                predict = factory(model, nc.config, x_lat[:1], onnx_mode=str(cfg.onnx_mode), threads=threads,
                                  workdir=work, calibration=calibration)  # fmt: skip
            except NotImplementedError as e:
                raise ConfigError(f"onnx_mode: {cfg.onnx_mode!r} is not available ({e}); use onnx_mode=exact") from e
            except ValueError as e:  # freeze refusing a configuration, e.g. bits a slim artifact did not keep
                field = {"uniform": "bits", "pareto": "pareto"}.get(nc.source, "checkpoint")
                raise ConfigError(f"{field}: {nc.name}: {e}") from e
            acc, n = accuracy(predict, batches)
            ms = latency_ms(predict, x_lat, warmup=int(lat.warmup), repeats=int(lat.batches))
            rows.append(EvalRow(nc.name, nc.source, nc.avg_bits, acc, ms, n, nc.config))
    result: dict[str, Any] = {
        "checkpoint": str(cfg.checkpoint),
        "device": {"cpu": cpu_name(), "threads": threads, "torch": torch.__version__},
        "runtime": runtime,
        "data": str(cfg.data._target_),
        "split": split,
        "n_images": rows[0].n_images if rows else 0,
        "latency_batch_size": int(lat.batch_size),
        "preprocessing": pp,
        "rows": [r.to_json() for r in rows],
    }
    if runtime == "onnx":
        import onnxruntime

        result["onnx_mode"] = str(cfg.onnx_mode)
        result["device"]["onnxruntime"] = onnxruntime.__version__
    names = getattr(model, "dbq_class_names", None)
    if names:
        result["class_names"] = list(names)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "eval.json").write_text(json.dumps(result, indent=2))
    title = f"dbq-eval: {runtime}, {split} split ({result['n_images']} images), {threads} thread(s)"
    plot_eval(rows, out / "eval.png", title=title)
    print_eval(rows, title)
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Console script ``dbq-eval``."""
    from hydra.core.hydra_config import HydraConfig

    run_eval(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
