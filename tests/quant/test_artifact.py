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
