"""The weight-quantizer registry: one class per weight_mode, codes/decode round trips, iter_quantizers, and the
guarantee that no module outside the registry switches on weight-mode strings."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lightning_dbq as dbq
from lightning_dbq.options import WEIGHT_MODES
from lightning_dbq.quant.layers import iter_quantizers
from lightning_dbq.quant.packing import pack_codes, unpack_codes
from lightning_dbq.quant.quantizers import (
    DoubleRoundWeightQuantizer,
    FloorWeightQuantizer,
    UnsharedWeightQuantizer,
    WeightQuantizer,
)
from lightning_dbq.quant.registry import (
    WEIGHT_QUANTIZERS,
    register_weight_quantizer,
    weight_modes,
    weight_quantizer_class,
)
from tests.helpers.tiny import TinyNet

PACKAGE = Path(dbq.__file__).parent
BITS = {"binary": (1,)}  # every other built-in mode: multi-precision bits


def _bits(mode: str) -> tuple[int, ...]:
    return BITS.get(mode, (8, 4, 2))


def test_builtin_modes_match_the_cli_options() -> None:
    assert weight_modes()[: len(WEIGHT_MODES)] == WEIGHT_MODES
    for mode in WEIGHT_MODES:
        cls = WEIGHT_QUANTIZERS[mode]
        assert issubclass(cls, WeightQuantizer) and cls.mode == mode
        assert issubclass(cls.act_quantizer, dbq.quant.ActQuantizer)


@pytest.mark.parametrize("mode", WEIGHT_MODES)
def test_factory_builds_the_registered_class(mode: str) -> None:
    w = torch.randn(6, 4, 3, 3) * 0.05
    q = WeightQuantizer(w, _bits(mode), mode=mode)
    assert type(q) is weight_quantizer_class(mode)
    assert type(WeightQuantizer(w, [8, 4])) is DoubleRoundWeightQuantizer  # the default mode
    with pytest.raises(ValueError, match=rf"is weight_mode '{mode}', got mode='nope'"):
        type(q)(w, _bits(mode), mode="nope")


def test_unknown_mode_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"`weight_mode` must be one of \('double_round', 'floor', 'unshared', 'bin"):
        weight_quantizer_class("ceil")
    with pytest.raises(ValueError, match="`weight_mode` must be one of"):
        WeightQuantizer(torch.randn(4, 4), [8, 4], mode="ceil")


@pytest.mark.parametrize("mode", WEIGHT_MODES)
def test_codes_decode_round_trip(mode: str) -> None:
    """codes → decode → codes is the identity, and the decoded weight fake-quantizes exactly like the original at
    every bit (eval mode: what a loaded artifact computes); the packed storage round-trips too."""
    torch.manual_seed(0)
    w = torch.randn(8, 5, 3, 3) * 0.05
    cls = weight_quantizer_class(mode)
    q = cls(w, _bits(mode), per_channel=True).eval()
    if not cls.has_codes:
        with pytest.raises(ValueError, match="no shared integer codes"):
            q.codes(w)
        assert cls.storage_bits(q.high_bits) == 32
        return
    codes = q.codes(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    rebuilt = q.decode(codes, q.high_bits)
    assert torch.equal(q.codes(rebuilt), codes)
    with torch.no_grad():
        for b in q.bits:
            q.active_bits = b
            assert torch.equal(q(rebuilt), q(w)), (mode, b)
    packed = pack_codes(codes, q.high_bits)
    assert packed.numel() * 8 >= codes.numel() * cls.storage_bits(q.high_bits)
    assert torch.equal(unpack_codes(packed, q.high_bits, codes.numel()).reshape(w.shape), codes)


@pytest.mark.parametrize(
    ("mode", "keys"),
    [("double_round", ["scale", "scale_ref"]), ("floor", ["scale", "scale_ref"]),
     ("unshared", ["scales.2", "scales.4", "scales.8"]), ("binary", ["alpha"])],
)  # fmt: skip
def test_state_dict_keys_per_mode(mode: str, keys: list[str]) -> None:
    q = weight_quantizer_class(mode)(torch.randn(4, 3, 3, 3), _bits(mode))
    assert sorted(q.state_dict()) == keys


def test_old_pickles_with_a_mode_attribute_get_their_class() -> None:
    """Modules pickled before the registry were one class with ``mode`` in their ``__dict__``."""
    q = DoubleRoundWeightQuantizer(torch.randn(4, 4), [8, 2])
    state = q.__getstate__()
    state["mode"] = "floor"
    old = WeightQuantizer.__new__(WeightQuantizer)
    old.__setstate__(state)
    assert type(old) is FloorWeightQuantizer and "mode" not in old.__dict__
    again = pickle.loads(pickle.dumps(UnsharedWeightQuantizer(torch.randn(4, 4), [8, 2])))
    assert type(again) is UnsharedWeightQuantizer


def test_a_registered_mode_is_used_by_prepare() -> None:
    @register_weight_quantizer("test_round_only")
    class RoundOnly(DoubleRoundWeightQuantizer):
        """Double Rounding without the lower bits' nesting (a test mode)."""

    try:
        assert weight_quantizer_class("test_round_only") is RoundOnly
        model = dbq.prepare(TinyNet(), bits=[8, 4], weight_mode="test_round_only")
        assert {type(q.weight_quant) for q in iter_quantizers(model)} == {RoundOnly}
        with pytest.raises(ValueError, match="already registered"):
            register_weight_quantizer("test_round_only")(DoubleRoundWeightQuantizer)
    finally:
        WEIGHT_QUANTIZERS.pop("test_round_only", None)
    with pytest.raises(ValueError, match="non-empty string"):
        register_weight_quantizer("")


def _expected_quantized(fp: nn.Module) -> list[str]:
    """Independently: every Conv/Linear except timm's first conv and classifier, in registration order."""
    cfg = fp.pretrained_cfg
    skip = {cfg["first_conv"], cfg["classifier"]}
    return [n for n, m in fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in skip]


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
@pytest.mark.parametrize("mode", ["double_round", "binary"])
def test_iter_quantizers_finds_every_quantized_layer(name: str, mode: str) -> None:
    fp = dbq.quant.create_fp_model(name, num_classes=10)
    want = _expected_quantized(fp)
    model = dbq.prepare(fp, bits=_bits(mode), weight_mode=mode)
    found = list(iter_quantizers(model))
    assert [q.name for q in found] == want and len(want) > 10
    for q in found:
        layer = model.get_submodule(q.name)
        assert q.layer is layer and q.weight_quant is layer.weight_quant and q.act_quant is layer.act_quant
        assert type(q.weight_quant) is weight_quantizer_class(mode)
        assert type(q.act_quant) is weight_quantizer_class(mode).act_quantizer
    assert [q.name for q in iter_quantizers(dbq.quant.create_fp_model(name))] == []


# a comparison of anything with a weight-mode name, e.g. `spec.weight_mode == "unshared"`, `"floor" != mode`,
# `mode in ("floor", ...)`, or `weight_mode == <anything>`
_NAMES = "|".join(re.escape(m) for m in WEIGHT_MODES)
_SWITCH = re.compile(
    rf"""(==|!=)\s*["']({_NAMES})["']|["']({_NAMES})["']\s*(==|!=)|\bin\s*[\(\[{{]\s*["']({_NAMES})["']"""
    r"|weight_mode\s*(==|!=)"
)


def test_the_switch_pattern_catches_mode_switches() -> None:
    """The scan below can fail: its pattern matches the switches it is meant to forbid."""
    for line in ('if spec.weight_mode == "unshared":', "if mode != 'floor':", 'if "binary" == mode:',
                 'if mode not in ("double_round", "floor"):', "x = weight_mode != other"):  # fmt: skip
        assert _SWITCH.search(line), line
    for line in ('register_weight_quantizer("floor")', 'weight_quantizer_class("binary")', 'mode: str = "floor"'):
        assert not _SWITCH.search(line), line


def test_no_weight_mode_switch_outside_the_registry() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "registry.py" and path.parent.name == "quant":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _SWITCH.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not offenders, "weight-mode switches outside quant/registry.py:\n" + "\n".join(offenders)


def test_binary_mode_bits_are_refused_for_multi_precision_modes() -> None:
    with pytest.raises(ValueError, match=r"weight_mode='double_round' needs bits in \[2, 8\], got \[1\]; bits=\[1\]"):
        dbq.prepare(TinyNet(), bits=[1])
    with pytest.raises(ValueError, match=r"values must be in \[2, 8\], got 1 in \[8, 1\]; 1 bit is allowed only"):
        dbq.prepare(TinyNet(), bits=[8, 1], weight_mode="binary")
    with pytest.raises(ValueError, match=r"weight_mode='binary' needs bits=\[1\]"):
        dbq.prepare(TinyNet(), bits=[2], weight_mode="binary")
    assert np.array_equal(dbq.QuantSpec(bits=(1,), weight_mode="binary").bits, (1,))
