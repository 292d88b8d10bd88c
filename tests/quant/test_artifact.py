"""Integer artifact: exact round trip in a fresh process, size ratios, packing, and corrupt-file errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import lightning_dbq as dbq
from lightning_dbq.quant.packing import pack_codes, unpack_codes


def _trained_like(bits: tuple[int, ...], seed: int = 0) -> torch.nn.Module:
    """A resnet18 whose activation scales are initialised and whose per-bit BN statistics differ per bit."""
    torch.manual_seed(seed)
    model = dbq.create_model("resnet18", bits=bits, num_classes=10)
    model.train()
    for b in bits:
        dbq.set_bits(model, b)
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    return model


def _fp32_bytes(num_classes: int = 10) -> int:
    return sum(
        t.numel() * t.element_size()
        for t in timm.create_model("resnet18", num_classes=num_classes).state_dict().values()
    )


@pytest.mark.parametrize(("bits", "limit"), [((8, 6, 4, 2), 0.26), ((4, 3, 2), 0.14)])
def test_round_trip_in_fresh_process_and_size_ratio(tmp_path: Path, bits, limit, report) -> None:
    model = _trained_like(bits)
    path = dbq.save_int(model, tmp_path / "r18.dbq.safetensors")
    ratio = path.stat().st_size / _fp32_bytes()
    report(f"artifact bytes / FP32 state_dict bytes, resnet18 {list(bits)}: {ratio:.4f} (limit {limit})")
    assert ratio <= limit
    x = torch.randn(4, 3, 32, 32)
    layers = [i.name for i in dbq.quantized_layers(model)]
    g = torch.Generator().manual_seed(1)
    mixed = {n: bits[int(torch.randint(len(bits), (1,), generator=g))] for n in layers}
    expected = {}
    with torch.no_grad():
        for b in bits:
            dbq.set_bits(model, b)
            expected[str(b)] = model(x)
        dbq.set_bits(model, mixed)
        expected["mixed"] = model(x)
    torch.save({"x": x, "expected": expected, "mixed": mixed}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch, lightning_dbq as dbq
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = dbq.load_int({str(path)!r})
        assert "lightning" not in sys.modules
        worst = 0.0
        with torch.no_grad():
            for key, want in ref["expected"].items():
                dbq.set_bits(model, ref["mixed"] if key == "mixed" else int(key))
                worst = max(worst, (model(ref["x"]) - want).abs().max().item())
        print(worst)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    worst = float(out.stdout.strip().splitlines()[-1])
    report(
        f"load_int round trip {list(bits)} (fresh process, every bit + one mixed config): max |Δlogit| = {worst:.2e}"
    )
    assert worst <= 1e-6


def test_manifest_contents(tmp_path: Path) -> None:
    model = _trained_like((8, 4, 2))
    path = dbq.save_int(model, tmp_path / "m.dbq.safetensors", extra={"note": "hi"})
    man = dbq.read_manifest(path)
    assert man["format"] == "lightning_dbq.int" and man["version"] == 2
    assert man["bits"] == [8, 4, 2] and man["model"] == {"name": "resnet18", "kwargs": {"num_classes": 10}}
    assert [layer["name"] for layer in man["layers"]] == [i.name for i in dbq.quantized_layers(model)]
    assert len(man["checksum"]) == 64 and man["extra"] == {"note": "hi"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.dbq.safetensors"]  # atomic write leaves no temp file


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for n in (1, 3, 7, 1000):
        codes = torch.randint(lo, hi + 1, (n,), dtype=torch.int8)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, n), codes)
        assert packed.numel() == {2: -(-n // 4), 3: -(-n // 2), 4: -(-n // 2)}.get(bits, n)


def _small_artifact(tmp_path: Path) -> Path:
    return dbq.save_int(_trained_like((8, 4)), tmp_path / "a.dbq.safetensors")


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    path = _small_artifact(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.dbq.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        dbq.load_int(bad)


def test_altered_tensors_fail_the_checksum(tmp_path: Path) -> None:
    path = _small_artifact(tmp_path)
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8 + header_len + 100] ^= 0xFF  # flip one byte of tensor data; header stays valid
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum: mismatch"):
        dbq.load_int(path)


def test_non_dbq_safetensors_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a lightning_dbq artifact"):
        dbq.load_int(path)
    with pytest.raises(FileNotFoundError, match="no such artifact"):
        dbq.load_int(tmp_path / "missing.dbq.safetensors")


def test_wrong_format_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    meta = {"lightning_dbq": json.dumps({"format": "lightning_dbq.int", "version": 99})}
    save_file({"w": torch.zeros(3)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="version 99"):
        dbq.load_int(path)


def test_unprepared_model_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not prepared"):
        dbq.save_int(timm.create_model("resnet18", num_classes=10), tmp_path / "x.dbq.safetensors")


def test_artifact_file_mode_follows_the_umask(tmp_path) -> None:
    """Artifacts are readable by other users under the usual umask (mkstemp alone would give 0600)."""
    import os
    import stat

    from tests.helpers.tiny import TinyNet

    model = dbq.prepare(TinyNet(), bits=[8, 2])
    model(torch.randn(2, 3, 8, 8))
    old = os.umask(0o022)
    try:
        path = dbq.save_int(model.eval(), tmp_path / "m.dbq.safetensors", model_name="cifar_resnet20")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        path = dbq.save_int(model, tmp_path / "m.dbq.safetensors", model_name="cifar_resnet20")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


# ---------------------------------------------------------------- preprocessing and class names in the manifest

PRE = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "image_size": 32, "interpolation": "bilinear",
       "channels": 3}  # fmt: skip
NAMES = ["ant", "bee", "cat", "dog"]


@pytest.fixture(scope="module")
def r20() -> torch.nn.Module:
    import lightning_dbq.models  # noqa: F401

    torch.manual_seed(0)
    model = dbq.create_model("cifar_resnet20", bits=[8, 4], num_classes=4)
    model(torch.randn(2, 3, 16, 16))
    return model.eval()


def test_preprocessing_and_class_names_round_trip(r20: torch.nn.Module, tmp_path: Path) -> None:
    path = dbq.save_int(r20, tmp_path / "m.dbq.safetensors", preprocessing=PRE, class_names=tuple(NAMES))
    man = dbq.read_manifest(path)
    assert man["preprocessing"] == PRE and man["class_names"] == NAMES
    assert man["config"] is None and man["available_bits"] is None
    loaded = dbq.load_int(path)
    assert loaded.dbq_preprocessing == PRE and loaded.dbq_class_names == NAMES
    assert loaded.dbq_available_bits == (8, 4) and loaded.dbq_config is None
    # the checksum covers them: an edit without re-signing is caught
    from tests.reliability.helpers import read

    manifest, tensors = read(path)
    manifest["class_names"][0] = "wasp"
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={"lightning_dbq": json.dumps(manifest)})
    with pytest.raises(dbq.ArtifactError, match="checksum: mismatch"):
        dbq.load_int(tmp_path / "edited.safetensors")


def test_artifacts_without_them_still_load(r20: torch.nn.Module, tmp_path: Path) -> None:
    from tests.reliability.helpers import read

    path = dbq.save_int(r20, tmp_path / "m.dbq.safetensors")
    manifest, tensors = read(path)
    assert not {"preprocessing", "class_names", "config", "available_bits"} & set(manifest)  # absent, not null
    loaded = dbq.load_int(path)
    assert loaded.dbq_preprocessing is None and loaded.dbq_class_names is None
    assert dbq.read_manifest(path)["class_names"] is None
    # an explicit null is the same as absent (the checksum ignores it)
    manifest["preprocessing"] = None
    save_file(tensors, str(tmp_path / "null.safetensors"), metadata={"lightning_dbq": json.dumps(manifest)})
    assert dbq.load_int(tmp_path / "null.safetensors").dbq_preprocessing is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"preprocessing": {**PRE, "std": [0.2, 0.0, 0.2]}}, "preprocessing.std"),
        ({"preprocessing": {**PRE, "mean": [0.5, 0.5]}}, "preprocessing.mean"),
        ({"preprocessing": {**PRE, "mean": [0.5, float("nan"), 0.5]}}, "preprocessing.mean"),
        ({"preprocessing": {**PRE, "image_size": 8193}}, "preprocessing.image_size"),
        ({"preprocessing": {**PRE, "image_size": 32.0}}, "preprocessing.image_size"),
        ({"preprocessing": {**PRE, "interpolation": "area"}}, "preprocessing.interpolation"),
        ({"preprocessing": {**PRE, "channels": 1}}, "preprocessing.mean"),
        ({"preprocessing": {**PRE, "crop": 0.9}}, "unknown key(s) ['crop']"),
        ({"preprocessing": [0.5]}, "preprocessing"),
        ({"class_names": NAMES[:3]}, "class_names: has 3 entries but the model has 4 classes"),
        ({"class_names": "ant bee cat dog"}, "class_names"),
        ({"class_names": ["a", "b", "c", 4]}, "class_names[3]"),
        ({"class_names": ["a", "b", "c", "x" * 257]}, "class_names[3]"),
    ],
)
def test_invalid_metadata_is_refused_at_save(r20: torch.nn.Module, tmp_path: Path, kwargs, field: str) -> None:
    with pytest.raises(dbq.ArtifactError) as info:
        dbq.save_int(r20, tmp_path / "x.dbq.safetensors", **kwargs)
    assert field in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(preprocessing={**PRE, "interpolation": "lanczos"}), "preprocessing.interpolation"),
        (lambda m: m.update(preprocessing={**PRE, "std": [1, -1, 1]}), "preprocessing.std"),
        (lambda m: m.update(preprocessing="resize"), "preprocessing"),
        (lambda m: m.update(class_names=NAMES + ["extra"]), "class_names: has 5 entries"),
        (lambda m: m.update(class_names={"0": "ant"}), "class_names"),
        (lambda m: m.update(class_names=["ant", None, "cat", "dog"]), "class_names[1]"),
        (lambda m: m.update(config={"conv": "4"}), "config"),
        (lambda m: m.update(available_bits="4"), "available_bits"),
    ],
)
def test_tampered_metadata_is_refused_at_load(r20: torch.nn.Module, tmp_path: Path, edit, field: str) -> None:
    from tests.reliability.helpers import resign

    good = dbq.save_int(r20, tmp_path / "m.dbq.safetensors", preprocessing=PRE, class_names=NAMES)
    bad = resign(good, tmp_path / "bad.dbq.safetensors", edit_manifest=edit)
    for reader in (dbq.read_manifest, dbq.load_int):
        with pytest.raises(dbq.ArtifactError) as info:
            reader(bad)
        assert field in str(info.value), str(info.value)


def test_class_names_checked_against_a_model_passed_in(r20: torch.nn.Module, tmp_path: Path) -> None:
    from tests.helpers.tiny import TinyNet

    model = dbq.prepare(TinyNet(num_classes=4), bits=[8, 2])
    model(torch.randn(2, 3, 8, 8))
    path = dbq.save_int(model.eval(), tmp_path / "t.dbq.safetensors", model_name="cifar_resnet20", class_names=NAMES)
    assert dbq.load_int(path, model=TinyNet(num_classes=4)).dbq_class_names == NAMES
    with pytest.raises(dbq.ArtifactError, match="class_names: has 4 entries but the model has 5"):
        dbq.load_int(path, model=TinyNet(num_classes=5))


def test_format_1_cannot_carry_the_new_fields(r20: torch.nn.Module, tmp_path: Path) -> None:
    """Format 1 did not checksum its manifest, so fields that format 2 added are refused there."""
    from tests.reliability.helpers import read

    manifest, tensors = read(dbq.save_int(r20, tmp_path / "m.dbq.safetensors", class_names=NAMES))
    manifest["version"] = 1
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"lightning_dbq": json.dumps(manifest)})
    with pytest.raises(dbq.ArtifactError, match=r"unknown field\(s\) \['class_names'\]"):
        dbq.read_manifest(tmp_path / "v1.safetensors")
