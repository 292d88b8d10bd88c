"""``dbq-export``: one bit configuration of a trained model to a deployable file.

``dbq-export checkpoint=PATH bits=4 format=onnx`` (a uniform bit-width) or ``dbq-export checkpoint=PATH
config=pareto.json@3 format=torchscript`` (row 3 of a ``pareto.json`` written by dbq-search; ``'config="p.json#3"'``
works too, quoted because Hydra reads ``#`` specially). ``PATH`` is an int artifact (``*.dbq.safetensors``) or a
DBQModule ``.ckpt``. Formats (:data:`lightning_dbq.search.options.EXPORT_FORMATS`): ``onnx`` (``onnx_mode=exact``
or ``integer``), ``torchscript`` (traced frozen model) and ``dbq`` (a slim int artifact of that configuration,
with the preprocessing and class names). The file goes to ``output=FILE``, default ``<hydra run dir>/model_<w4 |
pareto3><suffix>``; a short Rich summary is printed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.schema import check_export_config, parse_config_ref
from lightning_dbq.cli.validate import ConfigError, get_key

__all__ = ["export", "main"]

log = logging.getLogger("lightning_dbq.cli.export")


def _selection(cfg: DictConfig, model: Any) -> tuple[str, int | dict[str, int], str]:
    """``(field, config, tag)`` of the configuration ``cfg`` selects, checked against ``model``."""
    from lightning_dbq.search.configs import check_config, check_uniform_bits, pareto_row

    if cfg.get("bits") is not None:
        try:
            bits = check_uniform_bits(model, cfg.bits)
        except ValueError as e:
            raise ConfigError(f"bits: {e}") from e
        return "bits", bits, f"w{bits}"
    path, row = parse_config_ref(str(cfg.config))
    try:
        config = check_config(model, pareto_row(path, row)["config"], where=f"{str(path)!r} row {row}")
    except ValueError as e:
        raise ConfigError(f"config: {e}") from e
    return "config", config, f"pareto{row}"


def _metadata(cfg: DictConfig, model: Any, fmt: str) -> tuple[dict[str, Any] | None, list[str] | None]:
    """Preprocessing and class names: the artifact's; for ``format=dbq`` from a checkpoint, the data config's."""
    from lightning_dbq.search.serving import data_class_names, data_preprocessing

    preprocessing = getattr(model, "dbq_preprocessing", None)
    class_names = getattr(model, "dbq_class_names", None)
    if fmt == "dbq" and preprocessing is None:
        try:
            dm = hydra.utils.instantiate(cfg.data, _convert_="all")
        except Exception as e:  # a data root that is not here: export without the records, say so
            log.warning("dbq-export: no preprocessing recorded: data %s could not be built (%s)", cfg.data._target_, e)
            return None, class_names
        preprocessing = data_preprocessing(dm)
        class_names = class_names or data_class_names(dm)
        log.info("dbq-export: preprocessing and class names from data=%s", cfg.data._target_)
    return preprocessing, class_names


def export(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """Export the configuration ``cfg`` selects; returns the summary (``file``, ``bytes``, ``format``, ...).

    Raises:
        ConfigError: naming the field: ``checkpoint`` (missing, or neither artifact nor checkpoint), ``bits`` (not
            among the model's bits), ``config`` (not PATH#ROW, row out of range, layers that are not the model's),
            ``format`` (unknown), ``onnx_mode`` (not implemented), ``bits, config`` (both or neither).
    """
    check_export_config(cfg)
    import torch

    from lightning_dbq.cli.search import load_model
    from lightning_dbq.search.configs import average_bits
    from lightning_dbq.search.options import EXPORT_FORMATS, EXPORT_SUFFIXES, resolve
    from lightning_dbq.search.serving import example_input, input_shape

    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    fmt = str(cfg.format)
    try:
        writer = resolve(EXPORT_FORMATS, fmt, "format")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    model = load_model(str(cfg.checkpoint)).eval()
    field, config, tag = _selection(cfg, model)
    preprocessing, class_names = _metadata(cfg, model, fmt)
    shape = input_shape(preprocessing, int(get_key(cfg, "data.in_chans", 3)), int(get_key(cfg, "data.image_size", 32)))
    out = Path(cfg.output) if cfg.get("output") else Path(output_dir) / f"model_{tag}{EXPORT_SUFFIXES.get(fmt, '')}"
    from lightning_dbq.quant.artifact_check import ArtifactError

    calibration = None
    if fmt == "onnx" and str(cfg.onnx_mode) == "integer":
        from lightning_dbq.search.serving import calibration_inputs

        dm = hydra.utils.instantiate(cfg.data, _convert_="all")
        calibration = calibration_inputs(dm, preprocessing, int(cfg.calibration_images))
    try:
        writer(model, config, out, example_input=example_input(shape), onnx_mode=str(cfg.onnx_mode),
               preprocessing=preprocessing, class_names=class_names, calibration=calibration)  # fmt: skip
    except NotImplementedError as e:
        raise ConfigError(f"onnx_mode: {cfg.onnx_mode!r} is not available ({e}); use onnx_mode=exact") from e
    except ArtifactError:
        raise
    except ValueError as e:  # freeze/set_bits refusing the configuration (e.g. a slim artifact's other bits)
        raise ConfigError(f"{field}: {e}") from e
    summary = {"file": str(out), "bytes": out.stat().st_size, "format": fmt, "selection": tag,
               "avg_bits": average_bits(model, config), "input_shape": [1, *shape], "config": config}  # fmt: skip
    if fmt == "onnx":
        summary["onnx_mode"] = str(cfg.onnx_mode)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dbq-export", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    mode = f" ({summary['onnx_mode']})" if "onnx_mode" in summary else ""
    table.add_row("file", summary["file"])
    table.add_row("size", f"{summary['bytes'] / 1024:.1f} KiB")
    table.add_row("format", summary["format"] + mode)
    table.add_row("config", f"{summary['selection']}: {summary['avg_bits']:.2f} average bits")
    table.add_row("input", "x".join(str(d) for d in summary["input_shape"]))
    Console().print(table)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    """Console script ``dbq-export``."""
    from hydra.core.hydra_config import HydraConfig

    export(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
