"""Random one-byte mutations of a good artifact: each loads to the identical model or raises ArtifactError — never
another exception, never a silent change."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

import lightning_dbq as dbq
from tests.reliability.helpers import make_artifact, same_model

N = 50


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, int]:
    path = make_artifact(tmp_path_factory.mktemp("good"))
    data = path.read_bytes()
    return path, data, struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("region", ["header", "tensors"])
def test_fifty_one_byte_mutations(good: tuple[Path, bytes, int], tmp_path: Path, region: str, report) -> None:
    path, data, header_len = good
    reference = dbq.load_int(path)
    rng = random.Random(f"dbq-{region}")
    lo, hi = (8, 8 + header_len) if region == "header" else (8 + header_len, len(data))
    outcomes = {"identical": 0, "ArtifactError": 0}
    for i in range(N):
        pos = rng.randrange(lo, hi)
        new = rng.choice([b for b in range(256) if b != data[pos]])
        bad = tmp_path / f"m{i}.dbq.safetensors"
        bad.write_bytes(data[:pos] + bytes([new]) + data[pos + 1 :])
        try:
            loaded = dbq.load_int(bad)
        except dbq.ArtifactError:
            outcomes["ArtifactError"] += 1
            continue
        assert same_model(loaded, reference), f"byte {pos} -> {new}: loaded a different model silently"
        outcomes["identical"] += 1
    report(f"reliability: {N} one-byte {region} mutations -> {outcomes}")
    assert sum(outcomes.values()) == N
    if region == "tensors":
        assert outcomes["ArtifactError"] == N  # every tensor byte is covered by the checksum
