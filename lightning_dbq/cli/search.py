"""``dbq-search``: from a trained checkpoint or int artifact to evaluated SubNets.

``dbq-search checkpoint=PATH hydra.run.dir=DIR`` writes ``DIR/pareto.json`` (a list of
``{"avg_bits", "bops", "acc", "config"}`` sorted by ``avg_bits``), ``DIR/pareto.png``, ``DIR/bit_heatmap.png`` and
``DIR/traces.json`` (computed, or reused when given / found next to the checkpoint). The steps are
:mod:`lightning_dbq.search.pipeline`'s; a ``.ckpt`` and the int artifact of the same run give the same front (both
are profiled on the served ``h``-bit grid weights).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.schema import check_search_config
from lightning_dbq.cli.validate import ConfigError

__all__ = ["find_traces", "load_model", "main", "search"]

log = logging.getLogger("lightning_dbq.cli.search")


def load_model(path: str, field: str = "checkpoint") -> Any:
    """A bit-switchable model from an int artifact or a DBQModule checkpoint.

    Raises:
        ConfigError: missing file, or neither an artifact nor a DBQModule checkpoint (naming ``field``).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: {path!r} does not exist")
    if p.name.endswith(".safetensors"):
        from lightning_dbq.quant.artifact import load_int

        return load_int(p)
    import zipfile

    from lightning_dbq.training.module import DBQModule

    if p.stat().st_size == 0 or not zipfile.is_zipfile(p):
        raise ConfigError(
            f"{field}: {path!r} is neither an int artifact (*.safetensors) nor a Lightning checkpoint "
            "(a torch.save zip archive): empty, truncated or another kind of file"
        )
    try:
        return DBQModule.load_from_checkpoint(p, map_location="cpu").model
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"{field}: {path!r} is not a DBQModule checkpoint ({type(e).__name__}: {e})") from e


def find_traces(checkpoint: str, traces: str | None = None) -> Path | None:
    """``traces`` if given, else ``traces.json`` in the checkpoint's folder or the one above (a dbq-train run dir:
    ``DIR/model.dbq.safetensors`` and ``DIR/checkpoints/last.ckpt`` both find ``DIR/traces.json``), else ``None``."""
    if traces:
        return Path(traces)
    ckpt = Path(checkpoint).resolve()
    for d in (ckpt.parent, ckpt.parent.parent):
        if (d / "traces.json").is_file():
            return d / "traces.json"
    return None


def search(cfg: DictConfig, output_dir: str) -> list[dict[str, Any]]:
    """Run the search described by ``cfg`` and write the outputs into ``output_dir``."""
    check_search_config(cfg)
    import torch

    from lightning_dbq.quant.prepare import get_spec
    from lightning_dbq.search.pipeline import (
        default_budgets,
        layer_names,
        print_subnets,
        search_front,
        served_traces,
        write_search_outputs,
    )
    from lightning_dbq.search.profile import load_traces

    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    model = load_model(str(cfg.checkpoint)).eval()
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup()
    val = [(x, y) for x, y in dm.val_dataloader()]
    traces_path = find_traces(str(cfg.checkpoint), cfg.get("traces"))
    if traces_path is not None:
        log.info("dbq-search: reusing traces %s", traces_path)
        try:
            traces = load_traces(traces_path, layer_names(model))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"traces: {e}") from e
    else:
        h = cfg.hessian
        batches = dm.calibration_batches(num_images=int(h.num_images), batch_size=int(h.batch_size))
        traces = served_traces(model, batches, min_samples=int(h.min_samples), max_samples=int(h.max_samples),
                               rel_tol=float(h.rel_tol), seed=int(cfg.seed))  # fmt: skip
    budgets = OmegaConf.to_container(cfg.budgets) if cfg.get("budgets") else default_budgets(get_spec(model).bits)
    result = search_front(model, traces, val, budgets=budgets, method=str(cfg.method), cost=str(cfg.cost),  # type: ignore[arg-type]
                          max_bops=cfg.get("max_bops"), enumerate_alg2=bool(cfg.enumerate_alg2))  # fmt: skip
    write_search_outputs(result, output_dir, traces=True)
    print_subnets(result.subnets, result.n_layers)
    return result.rows()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="search")
def main(cfg: DictConfig) -> None:
    """Console script ``dbq-search``."""
    from hydra.core.hydra_config import HydraConfig

    search(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
