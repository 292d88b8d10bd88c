"""Statistics of the gradient estimators through the autograd Functions: unbiasedness (error of the mean of T draws
shrinking like T^-1/2), a mutation check (AGP without the 1/p rescale must fail it), the biased top-K, and the
variance ordering PTQ ≥ PSQ ≥ AGP at one average bit, BHQ < PSQ when one sample dominates. float64 throughout."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from lightning_dbq.fqt import grad_quant
from lightning_dbq.fqt.config import GradQuantConfig
from lightning_dbq.fqt.functions import fqt_conv, fqt_linear
from lightning_dbq.fqt.grad_quant import GRAD_METHODS, GradMethod

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _problem(kind: str, seed: int):
    """(forward(x, w, cfg, gen) -> y, exact op, x, w, heterogeneous gY)."""
    torch.manual_seed(seed)
    if kind == "conv":
        x, w = torch.randn(8, 3, 6, 6, dtype=DT), torch.randn(5, 3, 3, 3, dtype=DT)
        op = functools.partial(F.conv2d, stride=1, padding=1)
        fqt = lambda x, w, c, g: fqt_conv(x, w, None, c, g, 1, 1)  # noqa: E731
        gy_shape = (8, 5, 6, 6)
    else:
        x, w = torch.randn(4, 6, 10, dtype=DT), torch.randn(7, 10, dtype=DT)
        op = F.linear
        fqt = lambda x, w, c, g: fqt_linear(x, w, None, c, g)  # noqa: E731
        gy_shape = (4, 6, 7)
    scale = torch.exp(torch.randn(gy_shape[0], *([1] * (len(gy_shape) - 1)), dtype=DT))  # log-normal per sample
    gy = torch.randn(gy_shape, dtype=DT) * scale
    return fqt, op, x.requires_grad_(), w.requires_grad_(), gy


def _mean_errors(kind: str, cfg: GradQuantConfig, seed: int, t_small: int = 25, t_big: int = 400):
    """Relative errors ‖mean of T draws − exact‖/‖exact‖ of (gX, gW) at T = t_small and T = t_big."""
    fqt, op, x, w, gy = _problem(kind, seed)
    exact = torch.autograd.grad(op(x, w), (x, w), gy)
    y = fqt(x, w, cfg, _gen(seed + 100))
    sums = [torch.zeros_like(e) for e in exact]
    errors = {}
    for t in range(1, t_big + 1):
        for s, g in zip(sums, torch.autograd.grad(y, (x, w), gy, retain_graph=True), strict=True):
            s += g
        if t in (t_small, t_big):
            errors[t] = [float((s / t - e).norm() / e.norm()) for s, e in zip(sums, exact, strict=True)]
    return errors[t_small], errors[t_big]


def _converges(kind: str, cfg: GradQuantConfig, seeds=(0, 1)) -> bool:
    """Unbiased ⇔ the error of the mean falls like T^-1/2: 400 draws vs 25 is ×0.25 in expectation; require < 0.5
    for both gradients and every seed."""
    for seed in seeds:
        small, big = _mean_errors(kind, cfg, seed)
        if not all(b < 0.5 * s for s, b in zip(small, big, strict=True)):
            return False
    return True


CASES = [  # (layer kind, config): the three unbiased families on both layer kinds, the rest on conv
    *((kind, cfg) for kind in ("conv", "linear") for cfg in (
        GradQuantConfig(bits=2, method="psq"),
        GradQuantConfig(bits=4, method="agp", keep=0.5),
        GradQuantConfig(bits=2, method="bhq"),
    )),
    ("conv", GradQuantConfig(bits=1, method="ptq")),
    ("conv", GradQuantConfig(bits=4, method="agp", keep=0.25, scq=False)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "cfg"), CASES, ids=[f"{k}-{c.method}{c.bits}-keep{c.keep}-scq{int(c.scq)}" for k, c in CASES]
)
def test_estimators_are_unbiased(kind: str, cfg: GradQuantConfig) -> None:
    assert _converges(kind, cfg)


@pytest.mark.parametrize("estimator", ["unbiased", "no_rescale"])
def test_mutation_dropping_the_1_over_p_rescale_breaks_unbiasedness(
    estimator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unbiasedness check above can fail: the same AGP without 1/p keeps a bias that does not average out."""
    if estimator == "no_rescale":
        broken = functools.partial(grad_quant.agp, rescale=False)
        monkeypatch.setitem(GRAD_METHODS, "agp", GradMethod(broken, broken))
    cfg = GradQuantConfig(bits=4, method="agp", keep=0.5)
    assert _converges("conv", cfg, seeds=(2,)) is (estimator == "unbiased")
    if estimator == "no_rescale":
        _, (ex, ew) = _mean_errors("conv", cfg, 2)
        assert ex > 0.1 and ew > 0.1  # a persistent relative bias, not noise


def test_topk_is_biased() -> None:
    """The public code's deterministic top-K without rescale: the mean does not converge."""
    cfg = GradQuantConfig(bits=4, method="topk", keep=0.25)
    assert not _converges("conv", cfg, seeds=(0,))
    _, (ex, _) = _mean_errors("conv", cfg, 0)
    assert ex > 0.1


# ---------------------------------------------------------------- variance at equal average bits


def _heterogeneous(seed: int, n: int = 128, d: int = 512, sigma: float = 1.5) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(n, d, generator=g, dtype=DT) * torch.exp(sigma * torch.randn(n, 1, generator=g, dtype=DT))


def relative_mse(rows: torch.Tensor, method: str, bits: int, keep: float, draws: int, seed: int) -> float:
    """E‖ĝ − g‖² / ‖g‖² over ``draws`` draws of the per-sample estimator."""
    fn, gen = GRAD_METHODS[method].sample, _gen(seed)
    err = sum(float((fn(rows, bits, keep, gen) - rows).pow(2).sum()) for _ in range(draws))
    return err / draws / float(rows.pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_variance_ordering_ptq_psq_agp_at_one_average_bit(seed: int, report) -> None:
    rows = _heterogeneous(seed)
    ptq1 = relative_mse(rows, "ptq", 1, 1.0, 10, seed)
    psq1 = relative_mse(rows, "psq", 1, 1.0, 10, seed)
    agp = relative_mse(rows, "agp", 4, 0.25, 10, seed)  # 4 bits × 25% kept = 1 bit per element on average
    assert ptq1 > 1.5 * psq1 > 1.5 * 10 * agp, (ptq1, psq1, agp)
    if seed == 0:
        report(f"FQT relative MSE (128x512, log-normal sigma 1.5): PTQ-1 {ptq1:.3g}, PSQ-1 {psq1:.3g}, "
               f"AGP-4 keep 25% {agp:.3g}")  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_bhq_beats_psq_when_one_sample_dominates(seed: int) -> None:
    rows = torch.randn(64, 256, generator=_gen(seed), dtype=DT) * 0.01
    rows[seed + 3] *= 1000.0  # one sample's gradient dominates
    psq = relative_mse(rows, "psq", 2, 1.0, 20, seed)
    bhq = relative_mse(rows, "bhq", 2, 1.0, 20, seed)
    assert bhq < 0.5 * psq, (bhq, psq)
