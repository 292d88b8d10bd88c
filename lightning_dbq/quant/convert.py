"""Freeze a bit-switchable model into a plain inference model for ONE configuration (the inverse of prepare).

>>> import lightning_dbq as dbq
>>> model = dbq.create_model("cifar_resnet20", bits=[8, 6, 4, 2], num_classes=10)
>>> _ = model(torch.rand(2, 3, 32, 32))        # one batch initialises the activation scales
>>> frozen = dbq.freeze(model, 4)               # a new model; ``model`` is untouched
>>> frozen.dbq_frozen_config["layer1.0.conv1"]
4

What :func:`freeze` produces, layer by layer:

* each quantized layer is an instance of its **original class** again (``nn.Conv2d``, ``nn.Linear``, timm's
  ``StdConv2d``, ...; ``_dbq_base``), with the fake-quantized weight ``weight_quant(weight)`` at its bits folded
  in as a plain (``requires_grad=False``) ``weight`` Parameter; no ``weight_quant`` submodule is left;
* a layer whose input was quantized is wrapped: ``FrozenQuantLayer(act_quant=FrozenActQuant, layer=<original>)``
  runs ``layer(act_quant(x))`` (signed binary activations freeze to :class:`FrozenSignAct` instead). Placement
  choice: a two-child wrapper (explicit, one ``forward`` that
  ``torch.jit.trace``, ``torch.export`` and ``torch.compile`` see as plain calls) rather than a forward pre-hook
  (hidden state a reader of ``print(model)`` would miss) or a subclass of the layer (which would no longer be the
  original class). Its cost: the state-dict keys of a wrapped layer gain a level, ``conv1.weight`` becomes
  ``conv1.layer.weight`` and the activation scale is ``conv1.act_quant.scale``. Layers of models prepared with
  ``quantize_acts=False`` (or whose activation quantizer is disabled) keep their place and their keys;
* each frozen quantized layer (weight quantizer enabled) also carries its weight scale as a non-persistent buffer
  ``dbq_weight_scale`` (``s_h``: 0-dim, or ``(C, 1, ...)`` per channel; a binary layer's ``alpha``; not in the state
  dict) and its bits as the int attribute ``dbq_weight_bits``, so ``weight / dbq_weight_scale`` are its integer
  codes (``±1`` for binary layers; what ONNX export needs);
* each :class:`~lightning_dbq.quant.norm.PerBitNorm` / :class:`~lightning_dbq.quant.norm.TransitionalNorm` is
  replaced by its active copy (the plain ``BatchNorm2d`` / ``BatchNormAct2d`` of the configuration).

:class:`FrozenActQuant` computes ``clamp(floor(x/s + 1/2))·s`` with the same float32 operations in the same order as
the training kernels (fused and composite), so ``freeze(m, cfg)(x)`` equals ``set_bits(m, cfg).eval()(x)`` bit for
bit. Its scale is a 0-dim float32 buffer, not a Python float: it moves with ``.to(device)`` and stays a tensor on the
model's device, like the training scale, so the division is the same true division (PyTorch's CUDA kernel divides
by a *CPU scalar* as a multiplication by its reciprocal, which can differ in the last bit and flip a rounding).

Pure torch: no lightning, hydra or omegaconf import.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_dbq.quant.frozen import FrozenActQuant, FrozenSignAct
from lightning_dbq.quant.layers import DBQLayer, iter_quantizers
from lightning_dbq.quant.norm import PerBitNorm, TransitionalNorm
from lightning_dbq.quant.prepare import bit_config, get_spec, set_bits

__all__ = [
    "FROZEN_CONFIG_ATTR",
    "FROZEN_SPEC_ATTR",
    "WEIGHT_BITS_ATTR",
    "WEIGHT_SCALE_ATTR",
    "FrozenActQuant",
    "FrozenQuantLayer",
    "FrozenSignAct",
    "freeze",
]

FROZEN_CONFIG_ATTR = "dbq_frozen_config"
FROZEN_SPEC_ATTR = "dbq_frozen_spec"
WEIGHT_SCALE_ATTR = "dbq_weight_scale"  # non-persistent buffer on each frozen quantized layer: its weight scale
WEIGHT_BITS_ATTR = "dbq_weight_bits"  # int attribute on each frozen quantized layer: the bits it runs at
_SPEC_ATTR = "_dbq_spec"  # lightning_dbq.quant.prepare's marker of a switchable model


class FrozenQuantLayer(nn.Module):
    """``layer(act_quant(x))``: a frozen layer whose input is quantized.

    Args:
        act_quant: the frozen input quantizer (:class:`FrozenActQuant`, or :class:`FrozenSignAct` for signed
            binary activations).
        layer: the layer, an instance of its original class with the quantized weight folded in.
    """

    def __init__(self, act_quant: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.act_quant = act_quant
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        """Quantize the input, then run the layer."""
        return self.layer(self.act_quant(x))  # type: ignore[no-any-return]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def _freeze_layer(m: DBQLayer) -> nn.Module:
    """Fold ``m``'s quantized weight (its eval-mode value), restore its original class; wrap it when its input is
    quantized (the activation quantizer's own :meth:`~lightning_dbq.quant.quantizers.ActQuantizer.frozen`)."""
    assert isinstance(m, nn.Module)
    wq = m.weight_quant
    w = wq(m.weight).detach().clone()
    w_scale = wq.effective_scale().detach().float().clone() if wq.enabled else None  # s_h (export needs it)
    aq = m.act_quant
    frozen_aq = aq.frozen() if aq is not None and aq.enabled else None
    base = m._dbq_base
    del m.weight_quant
    del m.act_quant
    m.__dict__.pop("_dbq_base", None)
    m.__dict__.pop("_dbq_fast", None)
    m.__class__ = base  # type: ignore[assignment]
    m.weight = nn.Parameter(w, requires_grad=False)
    if w_scale is not None:  # for export: weight == codes · scale, codes = q_l·2^(h−l) (not in the state dict)
        m.register_buffer(WEIGHT_SCALE_ATTR, w_scale, persistent=False)
        setattr(m, WEIGHT_BITS_ATTR, int(wq.active_bits))
    return m if frozen_aq is None else FrozenQuantLayer(frozen_aq, m)


def freeze(model: nn.Module, bits: int | Mapping[str, int]) -> nn.Module:
    """A new inference-only model for one bit configuration of a prepared model (``model`` is left untouched).

    The result computes exactly what ``set_bits(model, bits).eval()`` computes (bit for bit on the same device and
    dtype), with no quantizer state left: original layer classes with folded weights, frozen activation quantizers
    (:class:`FrozenQuantLayer`), one norm per layer (see the module docstring). It is in eval mode, every parameter
    has ``requires_grad=False``, it is no longer bit-switchable (:func:`~lightning_dbq.set_bits` refuses it), and it
    records ``dbq_frozen_config`` (``{layer_name: bits}`` of every quantized layer) and ``dbq_frozen_spec`` (the
    :class:`~lightning_dbq.QuantSpec`). ``torch.jit.trace`` and ``torch.export.export`` reproduce it bit for bit;
    ``torch.compile`` captures it in one graph (Inductor's norms, GELU and some convolutions differ from eager in the
    last bit, which can move a quantized activation by one step). Works for every ``weight_mode`` and for
    ``quantize_acts=False``; a disabled quantizer
    (:func:`~lightning_dbq.quant_enabled`) is frozen as the identity it computes.

    Args:
        model: a model prepared with :func:`~lightning_dbq.prepare` (train or eval mode).
        bits: one ``int`` for every quantized layer, or ``{layer_name: bits}`` as :func:`~lightning_dbq.set_bits`
            accepts (layers not named keep their current bits).

    Returns:
        The frozen model (a deep copy).

    Raises:
        ValueError: ``model`` is not prepared; an unknown layer name or bits outside the candidate set (the same
            checks as ``set_bits``); an activation quantizer that never saw a batch (its scales are unset: run one
            training-mode forward first).
    """
    spec = get_spec(model)
    frozen = copy.deepcopy(model).eval()  # eval-mode weights: what set_bits(model, bits).eval() computes
    try:
        set_bits(frozen, bits)
    except ValueError as e:
        raise ValueError("freeze(): " + str(e).removeprefix("set_bits(): ")) from None
    layers = {q.name: q.layer for q in iter_quantizers(frozen)}
    uninit = [
        q.name
        for q in iter_quantizers(frozen)
        if q.act_quant is not None and q.act_quant.enabled and not bool(q.act_quant.initialized)
    ]
    if uninit:
        raise ValueError(
            f"freeze(): {len(uninit)} activation quantizer(s) never saw a batch, so their scales are unset: "
            f"{uninit[:5]}{' ...' if len(uninit) > 5 else ''}; run one forward pass in training mode first"
        )
    config = bit_config(frozen)
    frozen.__dict__.pop(_SPEC_ATTR, None)  # no longer switchable: get_spec / set_bits refuse it
    norms = [(n, m) for n, m in frozen.named_modules() if isinstance(m, (PerBitNorm, TransitionalNorm))]
    for name, norm in norms:
        key = norm.key(*norm.active) if isinstance(norm, TransitionalNorm) else str(norm.active_bits)
        _replace(frozen, name, norm.norms[key])
    for name, layer in layers.items():
        new = _freeze_layer(layer)
        if not name:  # the prepared model is itself one quantized layer
            frozen = new
        elif new is not layer:
            _replace(frozen, name, new)
    for p in frozen.parameters():
        p.grad = None
    frozen.eval().requires_grad_(False)
    setattr(frozen, FROZEN_CONFIG_ATTR, config)
    setattr(frozen, FROZEN_SPEC_ATTR, spec)
    return frozen
