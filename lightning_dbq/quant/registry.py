"""The weight-quantizer registry: one :class:`~lightning_dbq.quant.quantizers.WeightQuantizer` subclass per
``weight_mode``, looked up by name.

Each class owns everything that depends on its mode — its fake-quant, its stored codes and how they decode, how
lower bits nest in them, its storage width, whether it has shared codes at all, which activation quantizer goes
with it and which bit lists it accepts — so no other module compares ``weight_mode`` strings: they ask the class
(``weight_quantizer_class(spec.weight_mode).has_codes``) or the instance (``layer.weight_quant.codes(w)``).

Built-in modes (:data:`lightning_dbq.options.WEIGHT_MODES`): ``"double_round"`` (the method), ``"floor"`` and
``"unshared"`` (baselines) in :mod:`lightning_dbq.quant.quantizers`, ``"binary"`` in :mod:`lightning_dbq.quant.binary`.
A new mode is a subclass decorated with :func:`register_weight_quantizer`; ``prepare(model, weight_mode=name)``
then uses it (the command-line schema still lists the built-in modes only).

>>> from lightning_dbq.quant.registry import weight_quantizer_class
>>> weight_quantizer_class("floor").__name__
'FloorWeightQuantizer'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from lightning_dbq.quant.quantizers import WeightQuantizer

__all__ = ["WEIGHT_QUANTIZERS", "register_weight_quantizer", "weight_modes", "weight_quantizer_class"]

#: ``{weight_mode: class}``, filled by :func:`register_weight_quantizer` (built-ins on first lookup).
WEIGHT_QUANTIZERS: dict[str, type[WeightQuantizer]] = {}

# modules whose import registers the built-in modes (imported lazily: they import torch, this module does not)
_BUILTIN_MODULES = ("lightning_dbq.quant.quantizers", "lightning_dbq.quant.binary")

T = TypeVar("T", bound="type[WeightQuantizer]")


def register_weight_quantizer(name: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`~lightning_dbq.quant.quantizers.WeightQuantizer` subclass as ``name``.

    Sets the class attribute ``mode`` to ``name``.

    Raises:
        ValueError: ``name`` is empty or already registered to another class.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_weight_quantizer(): the mode name must be a non-empty string, got {name!r}")

    def register(cls: T) -> T:
        known = WEIGHT_QUANTIZERS.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"register_weight_quantizer(): weight_mode {name!r} is already registered to "
                             f"{known.__module__}.{known.__qualname__}")  # fmt: skip
        cls.mode = name
        WEIGHT_QUANTIZERS[name] = cls
        return cls

    return register


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def weight_modes() -> tuple[str, ...]:
    """Every registered ``weight_mode`` name (built-ins first, in registration order)."""
    _load_builtins()
    return tuple(WEIGHT_QUANTIZERS)


def weight_quantizer_class(mode: str) -> type[WeightQuantizer]:
    """The class registered as ``mode``.

    Raises:
        ValueError: ``mode`` is not registered (the message lists the registered modes).
    """
    _load_builtins()
    cls = WEIGHT_QUANTIZERS.get(mode) if isinstance(mode, str) else None
    if cls is None:
        raise ValueError(f"`weight_mode` must be one of {tuple(WEIGHT_QUANTIZERS)}, got {mode!r}")
    return cls
