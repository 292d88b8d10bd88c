"""``dbq-search``: from a trained checkpoint or int artifact to evaluated SubNets.

``dbq-search checkpoint=PATH hydra.run.dir=DIR`` writes ``DIR/pareto.json`` (a list of
``{"avg_bits", "bops", "acc", "config"}`` sorted by ``avg_bits``), ``DIR/pareto.png``, ``DIR/bit_heatmap.png`` and
``DIR/traces.json`` (computed, or reused when given / found next to the checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.validate import ConfigError

__all__ = ["load_model", "main", "search"]


def load_model(path: str) -> torch.nn.Module:
    """A bit-switchable model from an int artifact or a DBQModule checkpoint.

    Raises:
        ConfigError: missing file (key ``checkpoint``).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint: {path!r} does not exist")
    if p.name.endswith(".safetensors"):
        from lightning_dbq.quant.artifact import load_int

        return load_int(p)
    import zipfile

    from lightning_dbq.training.module import DBQModule

    if p.stat().st_size == 0 or not zipfile.is_zipfile(p):
        raise ConfigError(
            f"checkpoint: {path!r} is neither an int artifact (*.safetensors) nor a Lightning checkpoint "
            "(a torch.save zip archive): empty, truncated or another kind of file"
        )
    try:
        return DBQModule.load_from_checkpoint(p, map_location="cpu").model
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"checkpoint: {path!r} is not a DBQModule checkpoint ({type(e).__name__}: {e})") from e


def _find_traces(cfg: DictConfig) -> Path | None:
    if cfg.get("traces"):
        return Path(cfg.traces)
    ckpt = Path(cfg.checkpoint).resolve()
    for d in (ckpt.parent, ckpt.parent.parent):
        if (d / "traces.json").is_file():
            return d / "traces.json"
    return None


def search(cfg: DictConfig, output_dir: str) -> list[dict[str, Any]]:
    """Run the search described by ``cfg`` and write the outputs into ``output_dir``."""
    from lightning_dbq.quant.prepare import get_spec, quantized_layers
    from lightning_dbq.search.plots import plot_bit_heatmap, plot_pareto
    from lightning_dbq.search.profile import load_traces, plot_traces, profile_traces, save_traces
    from lightning_dbq.search.subnet import build_problem, evaluate, search_subnets, write_pareto

    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    out = Path(output_dir)
    model = load_model(str(cfg.checkpoint)).eval()
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup()
    val = [(x, y) for x, y in dm.val_dataloader()]
    names = [i.name for i in quantized_layers(model)]
    traces_path = _find_traces(cfg)
    if traces_path is not None:
        traces = load_traces(traces_path, names)
    else:
        h = cfg.hessian
        batches = dm.calibration_batches(num_images=int(h.num_images), batch_size=int(h.batch_size))
        traces = profile_traces(model, batches, min_samples=int(h.min_samples), max_samples=int(h.max_samples),
                                rel_tol=float(h.rel_tol), seed=int(cfg.seed))  # fmt: skip
    save_traces(traces, out / "traces.json")
    plot_traces(traces, out / "traces.png")
    problem = build_problem(model, traces, val[0][0], cost=str(cfg.cost))
    budgets = OmegaConf.to_container(cfg.budgets) if cfg.get("budgets") else None
    if budgets is None:
        from lightning_dbq.training.callbacks.search import default_budgets

        budgets = default_budgets(get_spec(model).bits)
    subnets = search_subnets(model, problem, val, budgets, method=str(cfg.method),  # type: ignore[arg-type]
                             max_bops=cfg.get("max_bops"), enumerate_alg2=bool(cfg.enumerate_alg2))  # fmt: skip
    uniform = {b: evaluate(model, b, val) for b in get_spec(model).bits}
    write_pareto(subnets, out / "pareto.json")
    plot_pareto(subnets, out / "pareto.png", uniform=uniform)
    plot_bit_heatmap(subnets, out / "bit_heatmap.png")
    from lightning_dbq.training.callbacks.search import _print

    _print(subnets, len(names))
    return [s.to_json() for s in subnets]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="search")
def main(cfg: DictConfig) -> None:
    """Console script ``dbq-search``."""
    from hydra.core.hydra_config import HydraConfig

    search(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
