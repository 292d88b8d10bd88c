"""Variance and bias of the gradient estimators on the synthetic benchmark of the FQT design notes.

gY is 128×512 (float64) with a log-normal per-sample scale (σ = 1.5). For each estimator (the per-sample path of
``GRAD_METHODS``): relative MSE ``E‖ĝ − g‖² / ‖g‖²`` (mean over ``--mse-draws`` draws) and relative bias of the mean
``‖mean(ĝ) − g‖ / ‖g‖`` after ``--bias-draws`` draws (unbiased estimators: ≈ √(MSE / draws)). Averaged over
``--seeds`` realisations of gY (the AGP numbers depend on the heavy-tailed scales). ``--overhead`` also times one
forward+backward of ``cifar_resnet20`` (batch 64, 16 px, one thread) with exact and quantized gradients.
Writes ``experiments/results/fqt_variance.json`` and prints a Markdown table.

    uv run python -m experiments.fqt.variance [--seeds 3] [--bias-draws 2000] [--overhead]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lightning_dbq.fqt.grad_quant import GRAD_METHODS

OUT = Path(__file__).parents[1] / "results" / "fqt_variance.json"
ROWS: list[tuple[str, str, int, float]] = [  # label, method, bits, keep
    ("PTQ 1-bit", "ptq", 1, 1.0),
    ("PSQ 1-bit", "psq", 1, 1.0),
    ("BHQ 1-bit", "bhq", 1, 1.0),
    ("PSQ 4-bit", "psq", 4, 1.0),
    ("BHQ 4-bit", "bhq", 4, 1.0),
    ("AGP 4-bit keep 25% (unbiased, avg 1 bit)", "agp", 4, 0.25),
    ("AGP 2-bit keep 50% (unbiased, avg 1 bit)", "agp", 2, 0.5),
    ("top-K 25% 4-bit (public code, biased)", "topk", 4, 0.25),
]


def synthetic_gy(seed: int, n: int = 128, d: int = 512, sigma: float = 1.5) -> torch.Tensor:
    """Gaussian rows times a log-normal per-row scale."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.exp(
        sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    )


def measure(rows: torch.Tensor, method: str, bits: int, keep: float, mse_draws: int, bias_draws: int, seed: int):
    """(relative MSE, relative bias of the mean) of one estimator on ``rows``."""
    fn, gen = GRAD_METHODS[method].sample, torch.Generator()
    gen.manual_seed(10_000 + seed)
    norm2 = float(rows.pow(2).sum())
    total, sq = torch.zeros_like(rows), 0.0
    for t in range(max(mse_draws, bias_draws)):
        est = fn(rows, bits, keep, gen)
        if t < mse_draws:
            sq += float((est - rows).pow(2).sum())
        total += est
    return sq / mse_draws / norm2, float((total / max(mse_draws, bias_draws) - rows).norm()) / math.sqrt(norm2)


def overhead(steps: int = 5) -> dict[str, float]:
    """Seconds per forward+backward of a prepared cifar_resnet20 at w4a4, exact vs quantized gradients."""
    import torch.nn.functional as F

    import lightning_dbq as dbq
    from lightning_dbq.fqt import GradQuantConfig, enable_grad_quant

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = dbq.create_model("cifar_resnet20", bits=[8, 4], num_classes=10)
    dbq.set_bits(model, 4)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    out: dict[str, float] = {}
    for label, cfg in [("exact", None), ("psq 8-bit", GradQuantConfig(bits=8)),
                       ("agp 4-bit keep 0.25", GradQuantConfig(bits=4, method="agp", keep=0.25)),
                       ("bhq 4-bit", GradQuantConfig(bits=4, method="bhq"))]:  # fmt: skip
        enable_grad_quant(model, cfg)
        F.cross_entropy(model(x), y).backward()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        out[label] = (time.perf_counter() - start) / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mse-draws", type=int, default=50)
    parser.add_argument("--bias-draws", type=int, default=2000)
    parser.add_argument("--overhead", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table: list[dict[str, Any]] = []
    for label, method, bits, keep in ROWS:
        per_seed = [measure(synthetic_gy(s), method, bits, keep, args.mse_draws, args.bias_draws, s)
                    for s in range(args.seeds)]  # fmt: skip
        mse = [m for m, _ in per_seed]
        bias = [b for _, b in per_seed]
        table.append({"estimator": label, "method": method, "bits": bits, "keep": keep,
                      "avg_bits": bits * keep, "rel_mse": mse, "rel_bias": bias,
                      "sqrt_mse_over_draws": [math.sqrt(m / args.bias_draws) for m in mse]})  # fmt: skip
    result: dict[str, Any] = {"shape": [128, 512], "sigma": 1.5, "seeds": args.seeds, "mse_draws": args.mse_draws,
                              "bias_draws": args.bias_draws, "rows": table}  # fmt: skip
    if args.overhead:
        result["seconds_per_fwd_bwd_cifar_resnet20_b64"] = overhead()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| estimator | avg bits | relative MSE (seeds {', '.join(map(str, range(args.seeds)))}) | "
          f"relative bias of the mean, {args.bias_draws} draws | √(MSE/draws) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for row in table:
        mse = " / ".join(f"{m:.3g}" for m in row["rel_mse"])
        bias = " / ".join(f"{b:.3g}" for b in row["rel_bias"])
        ref = " / ".join(f"{b:.3g}" for b in row["sqrt_mse_over_draws"])
        print(f"| {row['estimator']} | {row['avg_bits']:g} | {mse} | {bias} | {ref} |")
    for label, sec in result.get("seconds_per_fwd_bwd_cifar_resnet20_b64", {}).items():
        print(f"cifar_resnet20 fwd+bwd, batch 64, w4a4, {label}: {1000 * sec:.0f} ms")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
