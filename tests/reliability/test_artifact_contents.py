"""Attacks that carry a valid checksum (re-signed), so validation — not the checksum — must stop them: every one
raises ArtifactError naming the field or tensor, before any model is built (no network, no unpickling: the
suite-wide guard in tests/conftest.py makes both raise inside load_int)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_dbq as dbq
from tests.reliability.helpers import codes_key, make_artifact, resign

M = dict[str, Any]
T = dict[str, torch.Tensor]


def _set(path: str, value: Any) -> Callable[[M], None]:
    def edit(m: M) -> None:
        *parents, last = path.split(".")
        node: Any = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _drop(key: str) -> Callable[[M], None]:
    return lambda m: m.pop(key)


def _t(fn: Callable[[T], None]) -> Callable[[T], None]:
    return fn


def _first(t: T, suffix: str) -> str:
    return sorted(k for k in t if k.endswith(suffix))[0]


MANIFEST_CASES: dict[str, tuple[Callable[[M], Any], str]] = {
    "hf_hub_name": (_set("model.name", "hf-hub:org/model"), "model.name"),
    "url_name": (_set("model.name", "https://example.com/x.pth"), "model.name"),
    "path_name": (_set("model.name", "/etc/passwd"), "model.name"),
    "relative_path_name": (_set("model.name", "../weights/model"), "model.name"),
    "timm_file_prefix": (_set("model.name", "local-dir:/tmp/m"), "model.name"),
    "unknown_model": (_set("model.name", "resnet_does_not_exist"), "model.name"),
    "empty_name": (_set("model.name", ""), "model.name"),
    "name_not_string": (_set("model.name", 42), "model.name"),
    "model_not_object": (_set("model", ["cifar_resnet20"]), "model"),
    "checkpoint_path_kwarg": (_set("model.kwargs.checkpoint_path", "/tmp/x.pth"), "model.kwargs.checkpoint_path"),
    "pretrained_kwarg": (_set("model.kwargs.pretrained", True), "model.kwargs.pretrained"),
    "pretrained_cfg_overlay": (_set("model.kwargs.pretrained_cfg_overlay", {"file": "/x"}), "pretrained_cfg_overlay"),
    "huge_num_classes": (_set("model.kwargs.num_classes", 10**12), "model.kwargs.num_classes"),
    "negative_num_classes": (_set("model.kwargs.num_classes", -1), "model.kwargs.num_classes"),
    "string_num_classes": (_set("model.kwargs.num_classes", "4"), "model.kwargs.num_classes"),
    "bool_num_classes": (_set("model.kwargs.num_classes", True), "model.kwargs.num_classes"),
    "huge_in_chans": (_set("model.kwargs.in_chans", 10**6), "model.kwargs.in_chans"),
    "kwargs_not_object": (_set("model.kwargs", [1, 2]), "model.kwargs"),
    "bits_disagree_with_spec": (_set("bits", [8, 6, 2]), "manifest.bits"),
    "spec_bits_out_of_range": (_set("spec.bits", [9, 4, 2]), "manifest.spec"),
    "spec_unknown_field": (_set("spec.surprise", 1), "manifest.spec"),
    "spec_bad_weight_mode": (_set("spec.weight_mode", "magic"), "manifest.spec"),
    "spec_not_object": (_set("spec", "8,4,2"), "manifest.spec"),
    "spec_skip_string": (_set("spec.skip", "layer1"), "manifest.spec"),
    "layers_not_list": (_set("layers", {"a": 1}), "layers"),
    "layer_missing_field": (lambda m: m["layers"][0].pop("numel"), "layers[0]"),
    "layer_extra_field": (_set("layers.0.file", "/etc/passwd"), "layers[0]"),
    "layer_numel_mismatch": (_set("layers.0.numel", 7), "layers[0].numel"),
    "layer_huge_shape": (_set("layers.0.shape", [2**40, 2]), "layers[0].shape"),
    "layer_negative_shape": (_set("layers.0.shape", [-1, 432]), "layers[0].shape"),
    "layer_storage_bits": (_set("layers.0.storage_bits", 4), "layers[0].storage_bits"),
    "duplicate_layer": (lambda m: m["layers"].append(dict(m["layers"][0])), "].name: must be a unique string"),
    "layer_dropped": (lambda m: m["layers"].pop(0), "__codes__."),
    "layer_renamed": (_set("layers.0.name", "nonexistent.conv"), "__codes__.nonexistent.conv.weight"),
    "missing_checksum": (_drop("checksum"), "manifest"),
    "unknown_top_level": (_set("surprise", {"x": 1}), "manifest"),
    "future_version": (_set("version", 99), "manifest.format"),
    "other_format": (_set("format", "someone.else"), "manifest.format"),
    "missing_extra": (_drop("extra"), "manifest"),
    "missing_layers": (_drop("layers"), "manifest"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def good4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("good4"), bits=(4, 2))


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_attack(good: Path, tmp_path: Path, case: str) -> None:
    edit, field = MANIFEST_CASES[case]
    bad = resign(good, tmp_path / "bad.dbq.safetensors", edit_manifest=edit)
    with pytest.raises(dbq.ArtifactError) as info:
        dbq.load_int(bad)
    assert str(bad) in str(info.value)
    assert field in str(info.value), str(info.value)


def _codes_as(dtype: torch.dtype) -> Callable[[T], None]:
    def edit(t: T) -> None:
        k = codes_key(t)
        t[k] = t[k].to(dtype)

    return edit


def _poke(suffix: str, value: float) -> Callable[[T], None]:
    def edit(t: T) -> None:
        k = _first(t, suffix)
        v = t[k].clone()
        v.view(-1)[0] = value
        t[k] = v

    return edit


TENSOR_CASES: dict[str, tuple[Callable[[T], None], str]] = {
    "codes_int32": (_codes_as(torch.int32), "__codes__."),
    "codes_float32": (_codes_as(torch.float32), "__codes__."),
    "codes_int16": (_codes_as(torch.int16), "__codes__."),
    "codes_2d": (lambda t: t.update({codes_key(t): t[codes_key(t)].view(1, -1)}), "__codes__."),
    "codes_short": (lambda t: t.update({codes_key(t): t[codes_key(t)][:-1].clone()}), "__codes__."),
    "codes_long": (
        lambda t: t.update({codes_key(t): torch.cat([t[codes_key(t)], t[codes_key(t)][:1]])}),
        "__codes__.",
    ),  # fmt: skip
    "codes_missing": (lambda t: t.pop(codes_key(t)), "missing"),
    "nan_weight_scale": (_poke("weight_quant.scale", float("nan")), "weight_quant.scale"),
    "inf_weight_scale": (_poke("weight_quant.scale", float("inf")), "weight_quant.scale"),
    "zero_weight_scale": (_poke("weight_quant.scale", 0.0), "weight_quant.scale"),
    "nan_scale_ref": (_poke("weight_quant.scale_ref", float("nan")), "scale_ref"),
    "negative_scale_ref": (_poke("weight_quant.scale_ref", -0.01), "scale_ref"),
    "zero_scale_ref": (_poke("weight_quant.scale_ref", 0.0), "scale_ref"),
    "nan_act_scale": (_poke("act_quant.scales.4", float("nan")), "act_quant.scales.4"),
    "zero_act_scale": (_poke("act_quant.scales.2", 0.0), "act_quant.scales.2"),
    "inf_running_var": (_poke("running_var", float("inf")), "running_var"),
    "nan_fp_weight": (_poke("fc.weight", float("nan")), "fc.weight"),
    "nan_bias": (_poke("fc.bias", float("nan")), "fc.bias"),
    "uninitialised_act": (
        lambda t: t.update({_first(t, "act_quant.initialized"): torch.tensor(False)}),
        "act_quant.initialized",
    ),  # fmt: skip
    "scales_int": (lambda t: t.update({_first(t, "act_quant.scales.8"): torch.tensor(3)}), "act_quant.scales.8"),
    "extra_bit_tensor": (
        lambda t: t.update({"layer1.0.conv1.act_quant.scales.3": torch.tensor(0.1)}),
        "act_quant.scales.3",
    ),  # fmt: skip
    "extra_unknown_tensor": (lambda t: t.update({"surprise.weight": torch.zeros(3)}), "tensors"),
    "missing_tensor": (lambda t: t.pop(_first(t, "fc.bias")), "tensors"),
    "wrong_shape_fp": (lambda t: t.update({_first(t, "fc.weight"): torch.zeros(5, 64)}), "tensors"),
    "complex_tensor": (
        lambda t: t.update({_first(t, "fc.bias"): torch.zeros(4, dtype=torch.complex64)}),
        "fc.bias",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensor_attack(good: Path, tmp_path: Path, case: str) -> None:
    edit, field = TENSOR_CASES[case]
    bad = resign(good, tmp_path / "bad.dbq.safetensors", edit_tensors=edit)
    with pytest.raises(dbq.ArtifactError) as info:
        dbq.load_int(bad)
    assert field in str(info.value), str(info.value)


def test_codes_outside_the_high_bit_range(tmp_path: Path) -> None:
    """6-bit storage keeps int8 codes: a value of 100 is a valid int8 but not a 6-bit code."""
    path = make_artifact(tmp_path, bits=(6, 4, 2))

    def edit(t: T) -> None:
        k = codes_key(t)
        v = t[k].clone()
        v[0] = 100
        t[k] = v

    bad = resign(path, tmp_path / "bad.dbq.safetensors", edit_tensors=edit)
    with pytest.raises(dbq.ArtifactError, match=r"codes must lie in \[-32, 31\]"):
        dbq.load_int(bad)


def test_packed_codes_wrong_dtype(good4: Path, tmp_path: Path) -> None:
    bad = resign(good4, tmp_path / "bad.dbq.safetensors", edit_tensors=_codes_as(torch.int8))
    with pytest.raises(dbq.ArtifactError, match="torch.uint8"):
        dbq.load_int(bad)


@pytest.mark.parametrize(
    "raw", ["[1, 2, 3]", '"a string"', "not json {", "null", "{}", '{"format": "lightning_dbq.int"}']
)
def test_malformed_manifest(good: Path, tmp_path: Path, raw: str) -> None:
    bad = resign(good, tmp_path / "bad.dbq.safetensors", raw_manifest=raw)
    with pytest.raises(dbq.ArtifactError, match="manifest"):
        dbq.load_int(bad)


def test_hmac_key(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = dbq.load_int(good)
    signed = dbq.save_int(model, tmp_path / "s.dbq.safetensors", key="k1")
    assert dbq.read_manifest(signed)["hmac"]
    dbq.load_int(signed, key="k1")
    with pytest.raises(dbq.ArtifactError, match="hmac"):
        dbq.load_int(signed, key="k2")
    with pytest.raises(dbq.ArtifactError, match="hmac"):
        dbq.load_int(good, key="k1")  # unsigned artifact where a key is required
    monkeypatch.setenv("LIGHTNING_DBQ_ARTIFACT_KEY", "k2")
    with pytest.raises(dbq.ArtifactError, match="hmac"):
        dbq.load_int(signed)
    # an attacker who recomputes the checksum cannot recompute the HMAC
    forged = resign(signed, tmp_path / "f.dbq.safetensors", edit_manifest=_set("extra.acc", 0.99))
    monkeypatch.setenv("LIGHTNING_DBQ_ARTIFACT_KEY", "k1")
    with pytest.raises(dbq.ArtifactError, match="hmac"):
        dbq.load_int(forged)
