"""Write the CIFAR-10 study table into experiments/README.md from the cached JSON results.

uv run python -m experiments.cifar10.table
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
README = ROOT / "experiments" / "README.md"
COLUMNS = ("fp32", "w8a8", "w6a6", "w4a4", "w3a3", "w2a2")


def _rows() -> list[str]:
    from experiments.cifar10.study import _arms

    rows = []
    for arm in _arms():
        path = RESULTS / f"cifar10_{arm.name}.json"
        if not path.is_file():
            rows.append(f"| {arm.name} | {arm.seed} | " + " | ".join("pending" for _ in COLUMNS) + " | |")
            continue
        r = json.loads(path.read_text())
        cells = [f"{100 * r['val'][c]['acc']:.2f}" if c in r["val"] else "" for c in COLUMNS]
        rows.append(f"| {arm.name} | {arm.seed} | " + " | ".join(cells) + f" | {r['elapsed_s'] / 60:.1f} |")
    return rows


def main() -> None:
    """Replace the block between ``<!-- cifar10:start -->`` and ``<!-- cifar10:end -->``."""
    header = ["| arm | seed | " + " | ".join(COLUMNS) + " | minutes |", "|---" * (len(COLUMNS) + 3) + "|"]
    block = "\n".join(["<!-- cifar10:start -->", "Validation accuracy (%), 5,000-image held-out split:", "",
                       *header, *_rows(), "<!-- cifar10:end -->"])  # fmt: skip
    text = README.read_text()
    pattern = re.compile(r"<!-- cifar10:start -->.*?<!-- cifar10:end -->", re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.replace(
        "## Performance benchmarks", block + "\n\n## Performance benchmarks")  # fmt: skip
    README.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
