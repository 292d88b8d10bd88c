"""``enable_grad_quant(model, config)``: quantize the backward of every bit-switchable layer of a prepared model.

Each :class:`~lightning_dbq.quant.layers.DBQLayer` gets a :class:`LayerGradQuant` in its ``grad_quant`` attribute;
its forward then routes ``(fake-quantized x, fake-quantized w)`` through :func:`~lightning_dbq.fqt.fqt_conv` /
:func:`~lightning_dbq.fqt.fqt_linear`, so the gradients reaching the weight and activation quantizers (STE) are the
quantized-gradient estimates. Layers that ``prepare`` left in floating point (by default the first and the last
layer) are not DBQLayers and keep exact gradients. Forward bits and gradient bits are independent: the bit-switch
loop sets the former, this the latter.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dbq.fqt.config import GradQuantConfig
from lightning_dbq.fqt.functions import fqt_conv, fqt_linear
from lightning_dbq.quant.layers import is_quant_layer

__all__ = ["LayerGradQuant", "enable_grad_quant", "grad_quant_config", "layer_seed"]


def layer_seed(seed: int, index: int, rank: int = 0) -> int:
    """A 63-bit seed for layer ``index`` on process ``rank`` derived from ``seed`` (distinct, stable streams)."""
    digest = hashlib.blake2b(f"dbq-fqt:{seed}:{index}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class LayerGradQuant:
    """One layer's gradient quantization: the config, the layer's index and one seeded generator per device.

    Generators are created on first use, seeded with :func:`layer_seed` ``(config.seed, index, rank)`` (so DDP ranks
    draw independent noise), and survive pickling and ``copy.deepcopy`` with their state.
    """

    def __init__(self, config: GradQuantConfig, index: int) -> None:
        self.config = config
        self.index = index
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """This layer's generator on ``device``."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(layer_seed(self.config.seed, self.index, _rank()))
            self._generators[key] = gen
        return gen

    def __call__(self, layer: nn.Module, x: Tensor, w: Tensor) -> Tensor:
        """The layer's op on the fake-quantized ``x`` and ``w`` with a quantized backward."""
        bias: Tensor | None = layer.bias  # type: ignore[assignment]
        if isinstance(layer, nn.Linear):
            return fqt_linear(x, w, bias, self.config, self.generator(x.device))
        conv: Any = layer
        padding = conv.padding
        if isinstance(padding, str) or conv.padding_mode != "zeros":  # "same"/"valid", reflect, ...: pad first
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        unbatched = x.dim() == w.dim() - 1
        if unbatched:
            x = x.unsqueeze(0)
        y = fqt_conv(x, w, bias, self.config, self.generator(x.device), conv.stride, padding, conv.dilation,
                     conv.groups)  # fmt: skip
        return y.squeeze(0) if unbatched else y

    def __repr__(self) -> str:
        return f"LayerGradQuant({self.config}, index={self.index})"

    def __getstate__(self) -> dict[str, Any]:
        states = {k: g.get_state() for k, g in self._generators.items()}
        return {"config": self.config, "index": self.index, "generator_states": states}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config, self.index = state["config"], state["index"]
        self._generators = {}
        for key, value in state.get("generator_states", {}).items():
            try:
                gen = torch.Generator(device=key)
                gen.set_state(value)
            except RuntimeError:  # that device is not available here: re-seeded on first use
                continue
            self._generators[key] = gen


def enable_grad_quant(model: nn.Module, config: GradQuantConfig | Mapping[str, Any] | None) -> list[str]:
    """Quantize the backward of every bit-switchable layer of ``model`` (``None``: back to exact gradients).

    Every DBQLayer (in ``named_modules`` order, index ``i``) gets its own generator seeded from
    ``(config.seed, i, rank)``; calling this again resets them. Layers left in floating point by ``prepare`` (first
    and last by default) are not DBQLayers and keep exact gradients; bit-switchable layers that run their own
    forward (timm's ``StdConv2d``, ``Conv2dSame``, ...) keep exact gradients too, with a warning.

    Args:
        model: a model prepared with :func:`lightning_dbq.prepare`.
        config: a :class:`GradQuantConfig`, a mapping of its fields, or ``None``.

    Returns:
        The names of the layers whose gradients are now quantized (empty for ``None``).

    Raises:
        ValueError: an invalid config, or a model without bit-switchable layers.
    """
    if config is not None and not isinstance(config, GradQuantConfig):
        config = GradQuantConfig.from_mapping(config)
    layers = [(name, m) for name, m in model.named_modules() if is_quant_layer(m)]
    if config is not None and not layers:
        raise ValueError("enable_grad_quant: the model has no bit-switchable layers; call lightning_dbq.prepare first")
    names, skipped = [], []
    for index, (name, module) in enumerate(layers):
        module.__dict__.pop("grad_quant", None)
        if config is None:
            continue
        if not getattr(module, "_dbq_fast", False):
            skipped.append(name)
            continue
        module.__dict__["grad_quant"] = LayerGradQuant(config, index)
        names.append(name)
    if skipped:
        warnings.warn(
            f"enable_grad_quant: {len(skipped)} layer(s) run their own forward ({', '.join(skipped[:5])}"
            f"{', ...' if len(skipped) > 5 else ''}) and keep exact gradients",
            stacklevel=2,
        )
    return names


def grad_quant_config(model: nn.Module) -> GradQuantConfig | None:
    """The gradient quantization of ``model``'s first quantized-gradient layer, ``None`` when there is none."""
    for module in model.modules():
        hook = module.__dict__.get("grad_quant")
        if isinstance(hook, LayerGradQuant):
            return hook.config
    return None
