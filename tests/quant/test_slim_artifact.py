"""Slim int artifacts (``save_int(..., bits=...)``): one configuration or a bit subset, packed narrow.

References are independent of the code under test: the original model's own outputs (``torch.equal``), plain-Python
round-half-up arithmetic for the width search, and byte counts of the stored tensors.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import lightning_dbq as dbq
import lightning_dbq.models  # noqa: F401  (registers cifar_resnet20)
from lightning_dbq.quant.slim import narrowest_width
from tests.reliability.helpers import read, resign

BITS = (8, 6, 4, 2)


@pytest.fixture(scope="module")
def net() -> dict[str, Any]:
    """cifar_resnet20 with initialised activation scales, its input and its outputs at every bit."""
    torch.manual_seed(0)
    model = dbq.create_model("cifar_resnet20", bits=list(BITS), num_classes=10)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # initialises every bit's activation scales
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    layers = [i.name for i in dbq.quantized_layers(model)]
    rng = random.Random(1)
    mixed = {n: rng.choice(BITS[1:]) for n in layers}  # 6/4/2 only: a real saving over the full artifact
    with torch.no_grad():
        out = {b: dbq.set_bits(model, b)(x) for b in BITS}
        out["mixed"] = dbq.set_bits(model, mixed)(x)
    dbq.set_bits(model, 8)
    return {"model": model, "x": x, "out": out, "mixed": mixed, "layers": layers}


def _run(model: torch.nn.Module, x: torch.Tensor, bits: int | dict[str, int] | None = None) -> torch.Tensor:
    with torch.no_grad():
        if bits is not None:
            dbq.set_bits(model, bits)
        return model(x)


def _code_bytes(path: Path) -> int:
    """Bytes of the stored weight codes (every codes tensor is 1-D int8/uint8)."""
    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.startswith("__codes__."))  # noqa: SIM118


# ---------------------------------------------------------------- the width search (pure integers)


def _rhu_shift(q: int, k: int, bits: int) -> int:
    """Independent reference: clamp(floor(q / 2^k + 1/2)) to the signed ``bits``-bit range."""
    v = math.floor(q / 2**k + 0.5)
    return max(-(2 ** (bits - 1)), min(2 ** (bits - 1) - 1, v))


def test_double_rounding_is_not_transitive_so_the_width_is_searched() -> None:
    # 24 at 8 bits: 4-bit code rhu(1.5) = 2, then 2-bit rhu(2/4) = 1; but directly rhu(24/64) = 0
    width, codes = narrowest_width(torch.tensor([24]), 8, [4, 2])
    assert width == 5 and codes.tolist() == [3]
    assert narrowest_width(torch.tensor([24]), 8, [4])[0] == 4
    # 31 at 8 bits: the 7-bit Double Rounding code 16 gives 2 bits rhu(16/32) = 1, not rhu(31/64) = 0; 15 is right
    assert _rhu_shift(_rhu_shift(31, 1, 7), 5, 2) != _rhu_shift(31, 6, 2)
    width, codes = narrowest_width(torch.tensor([31]), 8, [4, 2])
    assert width == 5 and codes.tolist() == [3]
    # every 8-bit code: the lowest width at which SOME code reproduces every kept bit (brute force, plain Python)
    for kept in ([4, 2], [6, 2], [6, 4, 2], [4], [8, 2]):
        reachable = {
            w: {
                tuple(_rhu_shift(c * 2 ** (8 - w), 8 - b, b) for b in kept)
                for c in range(-(2 ** (w - 1)), 2 ** (w - 1))
            }
            for w in range(max(kept), 9)
        }
        for value in range(-128, 128):
            want = tuple(_rhu_shift(value, 8 - b, b) for b in kept)
            lowest = min(w for w, seen in reachable.items() if want in seen)
            width, codes = narrowest_width(torch.tensor([value]), 8, kept)
            assert width == lowest, (value, kept)
            c = int(codes[0])
            assert tuple(_rhu_shift(c * 2 ** (8 - width), 8 - b, b) for b in kept) == want, (value, kept)


# ---------------------------------------------------------------- round trips (torch.equal with the original)


def test_w4_slim_round_trip_and_unavailable_bits(net: dict[str, Any], tmp_path: Path) -> None:
    path = dbq.save_int(net["model"], tmp_path / "w4.dbq.safetensors", bits=4)
    man = dbq.read_manifest(path)
    assert man["config"] == dict.fromkeys(net["layers"], 4) and man["available_bits"] is None
    assert {(layer["code_bits"], layer["storage_bits"]) for layer in man["layers"]} == {(4, 4)}
    loaded = dbq.load_int(path)
    assert loaded.dbq_available_bits == (4,) and loaded.dbq_config == dict.fromkeys(net["layers"], 4)
    assert dbq.bit_config(loaded) == dict.fromkeys(net["layers"], 4)  # loaded at its configuration
    assert torch.equal(_run(loaded, net["x"]), net["out"][4])
    with pytest.raises(ValueError, match=r"keeps only bits \[4\]"):
        dbq.set_bits(loaded, 8)
    with pytest.raises(ValueError, match=r"keeps only bits \[4\]"):
        dbq.freeze(loaded, 2)
    assert torch.equal(dbq.freeze(loaded, 4)(net["x"]), net["out"][4])


def test_mixed_config_round_trip(net: dict[str, Any], tmp_path: Path) -> None:
    path = dbq.save_int(net["model"], tmp_path / "mixed.dbq.safetensors", bits=net["mixed"])
    man = dbq.read_manifest(path)
    assert man["config"] == net["mixed"]
    assert {layer["name"]: layer["code_bits"] for layer in man["layers"]} == net["mixed"]
    loaded = dbq.load_int(path)
    assert dbq.bit_config(loaded) == net["mixed"] and loaded.dbq_config == net["mixed"]
    assert loaded.dbq_available_bits == tuple(sorted(set(net["mixed"].values()), reverse=True))
    assert torch.equal(_run(loaded, net["x"]), net["out"]["mixed"])
    first = net["layers"][0]
    other = next(b for b in BITS if b != net["mixed"][first])
    with pytest.raises(ValueError, match=rf"{first!r} was loaded from a slim artifact"):
        dbq.set_bits(loaded, {first: other})


def test_subset_round_trip_at_every_kept_bit(net: dict[str, Any], tmp_path: Path, report) -> None:
    path = dbq.save_int(net["model"], tmp_path / "w42.dbq.safetensors", bits=[2, 4])
    man = dbq.read_manifest(path)
    assert man["available_bits"] == [4, 2] and man["config"] is None
    widths = [layer["code_bits"] for layer in man["layers"]]
    assert all(4 <= w <= 8 for w in widths)
    report(f"slim [4, 2] artifact, cifar_resnet20: code widths per layer {dict(sorted(_count(widths).items()))}")
    loaded = dbq.load_int(path)
    assert loaded.dbq_available_bits == (4, 2) and loaded.dbq_config is None
    assert dbq.bit_config(loaded) == dict.fromkeys(net["layers"], 4)  # the highest kept bit
    for b in (4, 2):
        assert torch.equal(_run(loaded, net["x"], b), net["out"][b]), b
    for b in (8, 6):
        with pytest.raises(ValueError, match=r"keeps only bits \[4, 2\]"):
            dbq.set_bits(loaded, b)
    # re-saving the loaded model keeps its selection; asking it for a bit it lost is refused
    again = dbq.save_int(loaded, tmp_path / "again.dbq.safetensors")
    assert dbq.read_manifest(again)["available_bits"] == [4, 2]
    assert torch.equal(_run(dbq.load_int(again), net["x"], 2), net["out"][2])
    with pytest.raises(dbq.ArtifactError, match=r"bits: .*keeps only bits \[4, 2\]"):
        dbq.save_int(loaded, tmp_path / "x.dbq.safetensors", bits=[8])


def _count(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def test_floor_mode_per_channel_subset(tmp_path: Path) -> None:
    from tests.helpers.tiny import TinyNet

    torch.manual_seed(3)
    model = dbq.prepare(TinyNet(), bits=[8, 4, 2], weight_mode="floor", per_channel=True)
    model(torch.randn(4, 3, 16, 16))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    want = {b: _run(model, x, b) for b in (4, 2)}
    path = dbq.save_int(model, tmp_path / "f.dbq.safetensors", model_name="cifar_resnet20", bits=[4, 2])
    loaded = dbq.load_int(path, model=TinyNet())
    for b in (4, 2):
        assert torch.equal(_run(loaded, x, b), want[b])


# ---------------------------------------------------------------- sizes


def test_w4_slim_size(net: dict[str, Any], tmp_path: Path, report) -> None:
    full = dbq.save_int(net["model"], tmp_path / "full.dbq.safetensors")
    slim = dbq.save_int(net["model"], tmp_path / "w4.dbq.safetensors", bits=4)
    from lightning_dbq.quant import create_fp_model

    fp32 = sum(
        t.numel() * t.element_size() for t in create_fp_model("cifar_resnet20", num_classes=10).state_dict().values()
    )
    code_ratio = _code_bytes(slim) / _code_bytes(full)
    report(f"slim w4 cifar_resnet20: file {slim.stat().st_size / full.stat().st_size:.3f}x the full [8,6,4,2] "
           f"artifact, {slim.stat().st_size / fp32:.3f}x FP32 state_dict; weight codes {code_ratio:.4f}x")  # fmt: skip
    assert 0.5 <= code_ratio <= 0.501  # one nibble instead of one byte per weight (plus odd-length padding)
    assert slim.stat().st_size < full.stat().st_size


def test_resnet18_w4_slim_vs_fp32(tmp_path: Path, report) -> None:
    import timm

    torch.manual_seed(0)
    model = dbq.create_model("resnet18", bits=list(BITS), num_classes=10)
    model(torch.randn(2, 3, 32, 32))
    path = dbq.save_int(model.eval(), tmp_path / "r18.dbq.safetensors", bits=4)
    fp32 = sum(
        t.numel() * t.element_size() for t in timm.create_model("resnet18", num_classes=10).state_dict().values()
    )
    ratio = path.stat().st_size / fp32
    report(f"slim w4 resnet18 (10 classes): artifact bytes / FP32 state_dict bytes = {ratio:.4f}")
    assert ratio < 0.16


# ---------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def w4(net: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dbq.save_int(net["model"], tmp_path_factory.mktemp("w4") / "w4.dbq.safetensors", bits=4)


def _layer0(field: str, value: Any):
    return lambda m: m["layers"][0].__setitem__(field, value)


def _config0(value: Any):
    return lambda m: m["config"].__setitem__(next(iter(m["config"])), value)


TAMPER = {
    "config_bit_not_candidate": (_config0(3), "config["),
    "config_bit_bool": (_config0(True), "config"),
    "config_bit_above_code_bits": (_config0(8), "code_bits"),
    "config_missing_layer": (lambda m: m["config"].pop(next(iter(m["config"]))), "config"),
    "config_unknown_layer": (lambda m: m["config"].update({"nope": 4}), "config"),
    "config_not_object": (lambda m: m.update(config=[4]), "config"),
    "config_and_subset": (lambda m: m.update(available_bits=[4]), "config"),
    "subset_not_candidate": (lambda m: m.update(config=None, available_bits=[5]), "available_bits"),
    "subset_repeated": (lambda m: m.update(config=None, available_bits=[4, 4]), "available_bits"),
    "subset_above_code_bits": (lambda m: m.update(config=None, available_bits=[8, 4]), "code_bits"),
    "full_with_narrow_codes": (lambda m: m.pop("config"), "layers[0].code_bits"),
    "code_bits_above_h": (_layer0("code_bits", 9), "layers[0].code_bits"),
    "code_bits_zero": (_layer0("code_bits", 0), "layers[0].code_bits"),
    "code_bits_string": (_layer0("code_bits", "4"), "layers[0].code_bits"),
    "code_bits_vs_storage": (_layer0("code_bits", 2), "layers[0].storage_bits"),
    "code_bits_widened": (lambda m: [_layer0("code_bits", 8)(m), _layer0("storage_bits", 8)(m)], "__codes__."),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_slim_manifest(w4: Path, tmp_path: Path, case: str) -> None:
    edit, field = TAMPER[case]
    bad = resign(w4, tmp_path / "bad.dbq.safetensors", edit_manifest=edit)
    with pytest.raises(dbq.ArtifactError) as info:
        dbq.load_int(bad)
    assert field in str(info.value), str(info.value)


def test_unsigned_edits_fail_the_checksum(w4: Path, tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    manifest, tensors = read(w4)
    manifest["config"][next(iter(manifest["config"]))] = 8
    save_file(tensors, str(tmp_path / "b.dbq.safetensors"), metadata={"lightning_dbq": json.dumps(manifest)})
    with pytest.raises(dbq.ArtifactError, match="checksum: mismatch"):
        dbq.load_int(tmp_path / "b.dbq.safetensors")


@pytest.mark.parametrize(
    ("bits", "match"),
    [
        (3, r"candidate bits \[8, 6, 4, 2\], got 3"),
        (True, "must be None, an int"),
        ("4", "must be None, an int"),
        ([4, 4], "distinct candidate bits"),
        ([], "distinct candidate bits"),
        ([4, 5], "distinct candidate bits"),
        ({"layer1.0.conv1": 4}, "must give every quantized layer its bits; missing"),
    ],
)
def test_save_refuses_bad_bits(net: dict[str, Any], tmp_path: Path, bits: Any, match: str) -> None:
    before = dbq.bit_config(net["model"])
    with pytest.raises(dbq.ArtifactError, match=r"bits: .*" + match):
        dbq.save_int(net["model"], tmp_path / "x.dbq.safetensors", bits=bits)
    assert not list(tmp_path.iterdir())
    assert dbq.bit_config(net["model"]) == before  # the validation leaves the model's bits alone


def test_config_with_unknown_layer_is_refused(net: dict[str, Any], tmp_path: Path) -> None:
    config = {**dict.fromkeys(net["layers"], 4), "nope": 4}
    with pytest.raises(dbq.ArtifactError, match="unknown layer name"):
        dbq.save_int(net["model"], tmp_path / "x.dbq.safetensors", bits=config)


def test_unshared_models_have_no_slim_artifact(tmp_path: Path) -> None:
    from tests.helpers.tiny import TinyNet

    model = dbq.prepare(TinyNet(), bits=[8, 4], weight_mode="unshared")
    model(torch.randn(2, 3, 8, 8))
    with pytest.raises(dbq.ArtifactError, match="unshared"):
        dbq.save_int(model.eval(), tmp_path / "x.dbq.safetensors", model_name="cifar_resnet20", bits=4)


def test_resave_of_a_slim_model_without_its_records_needs_bits(w4: Path, tmp_path: Path) -> None:
    loaded = dbq.load_int(w4)
    again = dbq.save_int(loaded, tmp_path / "again.dbq.safetensors")  # keeps its configuration
    assert dbq.read_manifest(again)["config"] == loaded.dbq_config
    del loaded.dbq_config, loaded.dbq_available_bits
    with pytest.raises(dbq.ArtifactError, match="pass bits= explicitly"):
        dbq.save_int(loaded, tmp_path / "x.dbq.safetensors")
    assert dbq.read_manifest(dbq.save_int(loaded, tmp_path / "y.dbq.safetensors", bits=4))["config"] is not None
