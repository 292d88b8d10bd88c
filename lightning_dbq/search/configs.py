"""Bit configurations to serve: uniform bit-widths and rows of a ``pareto.json``, checked against a model.

The functions raise ``ValueError`` with a message that reads after a field name (the command-line tools prefix it:
``config: row 7 is out of range ...``). Pure torch (no Lightning, no Hydra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lightning_dbq.quant.prepare import get_spec, quantized_layers

__all__ = [
    "NamedConfig",
    "average_bits",
    "check_config",
    "check_uniform_bits",
    "model_bits",
    "pareto_configs",
    "pareto_row",
    "read_pareto",
    "stored_config",
    "uniform_configs",
]

_AVAILABLE_BITS_ATTR = "dbq_available_bits"  # lightning_dbq.quant.slim.AVAILABLE_BITS_ATTR (slim-loaded models)
_CONFIG_ATTR = "dbq_config"  # lightning_dbq.quant.slim.CONFIG_ATTR (a one-configuration slim artifact)


@dataclass(frozen=True)
class NamedConfig:
    """One configuration to export or evaluate.

    Attributes:
        name: ``w4a4`` (uniform) or ``pareto[3]`` (row 3 of a pareto.json).
        config: one ``int`` for every quantized layer, or ``{layer: bits}``.
        avg_bits: parameter-weighted average bits over the quantized layers.
        source: ``"uniform"``, ``"pareto"`` or ``"stored"`` (the one configuration of a slim artifact).
    """

    name: str
    config: int | dict[str, int]
    avg_bits: float
    source: str


def model_bits(model: nn.Module) -> tuple[int, ...]:
    """The bit-widths ``model`` can run at uniformly (highest first): its candidate bits, or, for a model loaded
    from a slim artifact, the bits every quantized layer kept (possibly none for a mixed one-configuration one)."""
    allowed = set(get_spec(model).bits)
    for info in quantized_layers(model):
        kept = getattr(model.get_submodule(info.name), _AVAILABLE_BITS_ATTR, None)
        if kept is not None:
            allowed &= {int(b) for b in kept}
    return tuple(sorted(allowed, reverse=True))


def stored_config(model: nn.Module) -> NamedConfig | None:
    """The one configuration a slim artifact stored (``save_int(..., bits=config)``), or ``None``."""
    config = getattr(model, _CONFIG_ATTR, None)
    if not isinstance(config, Mapping):
        return None
    plain = {str(k): int(v) for k, v in config.items()}
    return NamedConfig("stored", plain, average_bits(model, plain), "stored")


def average_bits(model: nn.Module, config: int | Mapping[str, int]) -> float:
    """Parameter-weighted average bits of ``config`` over ``model``'s quantized layers."""
    infos = quantized_layers(model)
    total = sum(i.params for i in infos)
    if isinstance(config, int):
        return float(config)
    return sum(i.params * int(config[i.name]) for i in infos) / max(total, 1)


def check_uniform_bits(model: nn.Module, bits: Any) -> int:
    """``bits`` as an ``int`` that ``model`` can run at.

    Raises:
        ValueError: not an integer, or not one of the model's bits (the message lists them).
    """
    allowed = list(model_bits(model))
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{bits!r} is not one of the model's bits {allowed}")
    return bits


def check_config(model: nn.Module, config: Any, where: str = "the config") -> dict[str, int]:
    """``config`` as ``{layer: bits}`` naming exactly ``model``'s quantized layers, each at one of its bits.

    Raises:
        ValueError: not a mapping; the first model layer the config lacks, or the first config layer the model does
            not have (with the counts); a layer's bits outside the candidate bits.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{where} must be an object {{layer: bits}}, got {type(config).__name__}")
    names = [i.name for i in quantized_layers(model)]
    missing = [n for n in names if n not in config]
    extra = [str(n) for n in config if n not in set(names)]
    counts = f"({len(config)} layers in {where}, {len(names)} quantized layers in the model)"
    if missing:
        raise ValueError(f"layer {missing[0]!r} of the model is missing from {where} {counts}")
    if extra:
        raise ValueError(f"{where} names {extra[0]!r}, which is not a quantized layer of the model {counts}; "
                         f"the model's are e.g. {names[:3]}")  # fmt: skip
    allowed = list(get_spec(model).bits)
    out = {}
    for n in names:
        b = config[n]
        if isinstance(b, bool) or not isinstance(b, int) or b not in allowed:
            raise ValueError(f"layer {n!r} has bits {b!r} in {where}; allowed: {allowed}")
        out[n] = int(b)
    return out


def read_pareto(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``pareto.json`` written by ``dbq-search`` (each a dict with a ``config`` object).

    Raises:
        ValueError: not valid JSON, not a non-empty list, or a row without a ``config`` object.
    """
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a readable pareto.json ({type(e).__name__}: {e})") from e
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{str(path)!r} must hold a non-empty JSON list of rows (as dbq-search writes)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("config"), dict):
            raise ValueError(f"{str(path)!r} row {i} has no 'config' object {{layer: bits}}")
    return rows


def pareto_row(path: str | os.PathLike[str], row: int) -> dict[str, Any]:
    """Row ``row`` of a ``pareto.json``.

    Raises:
        ValueError: an unreadable file (:func:`read_pareto`) or a row out of range (the message gives the count).
    """
    rows = read_pareto(path)
    if not 0 <= row < len(rows):
        raise ValueError(f"row {row} is out of range: {str(path)!r} has {len(rows)} rows (0 to {len(rows) - 1})")
    return rows[row]


def uniform_configs(model: nn.Module, bits: Sequence[int] | None = None) -> list[NamedConfig]:
    """One :class:`NamedConfig` per uniform bit-width (default: every bit the model can run at), highest first.

    Raises:
        ValueError: a bit-width the model cannot run at.
    """
    chosen = [check_uniform_bits(model, b) for b in (bits if bits is not None else model_bits(model))]
    return [NamedConfig(f"w{b}a{b}", b, float(b), "uniform") for b in sorted(set(chosen), reverse=True)]


def pareto_configs(model: nn.Module, path: str | os.PathLike[str]) -> list[NamedConfig]:
    """One :class:`NamedConfig` per row of a ``pareto.json``, each checked against ``model`` (:func:`check_config`).

    Raises:
        ValueError: an unreadable file or a row that does not fit the model.
    """
    out = []
    for i, row in enumerate(read_pareto(path)):
        config = check_config(model, row["config"], where=f"{str(path)!r} row {i}")
        out.append(NamedConfig(f"pareto[{i}]", config, average_bits(model, config), "pareto"))
    return out
