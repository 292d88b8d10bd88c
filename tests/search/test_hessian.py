"""Tests for lightning_dbq.search.hessian against independent references.

References: closed forms (diagonal quadratic, last-layer cross-entropy curvature), exact Hessian blocks from
``torch.autograd.functional.hessian`` on tiny problems, and the Rademacher variance formulas of algos.md A.2.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_dbq.search.hessian import LayerTrace, hutchinson_traces, hutchinson_traces_whole_model

ESTIMATORS = [hutchinson_traces, hutchinson_traces_whole_model]
Batches = list[tuple[Tensor, Tensor]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # HVPs on a contended 2-core box are ~10x slower with 2 threads (algos.md A.6).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Quadratic(nn.Module):
    """Per-example loss ``x_i * 0.5 w^T A w`` with ``w = cat(w0, w1)``: dataset Hessian ``mean_i(x_i) * A``."""

    def __init__(self, A: Tensor, split: int, gen: torch.Generator) -> None:
        super().__init__()
        n = A.shape[0]
        self.w0 = nn.Parameter(torch.randn(split, generator=gen, dtype=torch.float64))
        self.w1 = nn.Parameter(torch.randn(n - split, generator=gen, dtype=torch.float64))
        self.register_buffer("A", A)

    def forward(self, x: Tensor) -> Tensor:
        w = torch.cat([self.w0, self.w1])
        return x * (0.5 * w @ self.A @ w)


def mean_loss(out: Tensor, _: Tensor) -> Tensor:
    return out.mean()


def quad_batches(sizes: list[int], gen: torch.Generator) -> Batches:
    return [(torch.rand(s, generator=gen, dtype=torch.float64) + 0.5, torch.zeros(s)) for s in sizes]


def small_cnn(gen: torch.Generator) -> nn.Sequential:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, 5),
    )
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():  # non-trivial running statistics: eval and train BN differ
        bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.num_batches_tracked.fill_(7)
    return model


def image_batches(sizes: list[int], gen: torch.Generator, classes: int = 5) -> Batches:
    return [(torch.randn(s, 3, 6, 6, generator=gen), torch.randint(0, classes, (s,), generator=gen)) for s in sizes]


def weight_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1}


def dataset_loss(model: nn.Module, batches: Batches, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable:
    """Weighted dataset-mean loss as a function of one named parameter (for the exact Hessian)."""
    total = sum(x.shape[0] for x, _ in batches)

    def of(name: str) -> Callable[[Tensor], Tensor]:
        def f(w: Tensor) -> Tensor:
            return sum(  # type: ignore[return-value]
                x.shape[0] / total * loss_fn(functional_call(model, {name: w}, (x,)), y) for x, y in batches
            )

        return f

    return of


def exact_block_traces(model: nn.Module, batches: Batches, names: list[str], loss_fn: Callable) -> dict[str, float]:
    was_training = model.training
    model.eval()
    of = dataset_loss(model, batches, loss_fn)
    out = {}
    for name in names:
        w = dict(model.named_parameters())[name].detach()
        H = torch.autograd.functional.hessian(of(name), w)
        out[name] = float(H.reshape(w.numel(), w.numel()).diagonal().sum())
    model.train(was_training)
    return out


def run(fn: Callable, model: nn.Module, batches: Batches, params: dict, **kw: object) -> dict[str, LayerTrace]:
    kw.setdefault("progress", False)
    return fn(model, batches, params, **kw)  # type: ignore[no-any-return]


@pytest.mark.parametrize("sizes", [[1], [2, 5, 3]])
def test_diagonal_quadratic_is_exact_with_one_sample(sizes: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    diag = torch.randn(10, generator=gen, dtype=torch.float64) * 3
    model = Quadratic(torch.diag(diag), 4, gen)
    batches = quad_batches(sizes, gen)
    xbar = float(torch.cat([x for x, _ in batches]).mean())  # size-weighted dataset mean
    params = {"w0": model.w0, "w1": model.w1}
    out = run(hutchinson_traces, model, batches, params, loss_fn=mean_loss, min_samples=1, max_samples=1)
    for name, block in (("w0", diag[:4]), ("w1", diag[4:])):
        assert out[name].num_samples == 1
        assert math.isnan(out[name].std_error)
        assert out[name].trace == pytest.approx(xbar * float(block.sum()), rel=1e-12, abs=1e-12)
        assert out[name].numel == block.numel()


def test_dense_spd_quadratic_mean_and_variance() -> None:
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(80, 80, generator=gen, dtype=torch.float64)
    A = M @ M.T / 80
    model = Quadratic(A, 40, gen)
    batches = [(torch.ones(1, dtype=torch.float64), torch.zeros(1))]
    params = {"w0": model.w0, "w1": model.w1}
    exact = exact_block_traces(model, batches, ["w0", "w1"], mean_loss)
    blocks = {"w0": slice(0, 40), "w1": slice(40, 80)}
    S = 300
    kw = {"loss_fn": mean_loss, "min_samples": S, "max_samples": S, "rel_tol": 1e-12}
    per_block = run(hutchinson_traces, model, batches, params, **kw)
    whole = run(hutchinson_traces_whole_model, model, batches, params, **kw)
    for name, sl in blocks.items():
        A_ll = A[sl, sl]
        assert exact[name] == pytest.approx(float(A_ll.trace()), rel=1e-10)
        var_block = 2 * float((A_ll**2).sum() - (A_ll.diagonal() ** 2).sum())
        var_whole = var_block + float((A[sl, :] ** 2).sum() - (A_ll**2).sum())
        for est, var in ((per_block[name], var_block), (whole[name], var_whole)):
            assert est.num_samples == S
            assert abs(est.trace - exact[name]) < 4 * est.std_error
            # sample variance of S near-Gaussian draws: relative std ~ sqrt(2 / S) = 0.08
            assert est.std_error**2 * S == pytest.approx(var, rel=0.35)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_last_linear_layer_matches_closed_form(estimator: Callable) -> None:
    gen = torch.Generator().manual_seed(2)
    model = small_cnn(gen)
    batches = image_batches([12, 20], gen)
    feats: list[Tensor] = []
    fc = model[8]
    handle = fc.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
    model.eval()
    with torch.no_grad():
        probs = torch.cat([F.softmax(model(x), dim=1) for x, _ in batches]).double()
    handle.remove()
    model.train()
    a = torch.cat(feats).double()
    curv = (probs * (1 - probs)).sum(1)
    exact_w = float((curv * (a**2).sum(1)).mean())
    exact_b = float(curv.mean())
    params = {"fc.weight": fc.weight, "fc.bias": fc.bias}
    S = 60 if estimator is hutchinson_traces else 200
    out = run(estimator, model, batches, params, min_samples=S, max_samples=S, rel_tol=1e-9)
    for name, exact in (("fc.weight", exact_w), ("fc.bias", exact_b)):
        assert abs(out[name].trace - exact) < 4 * out[name].std_error, (name, out[name], exact)
        assert out[name].normalized == pytest.approx(out[name].trace / out[name].numel)


def test_all_blocks_match_exact_hessian_traces() -> None:
    gen = torch.Generator().manual_seed(3)
    model = small_cnn(gen)
    batches = image_batches([8, 16], gen)
    params = weight_params(model)
    exact = exact_block_traces(model, batches, list(params), F.cross_entropy)
    out = run(hutchinson_traces, model, batches, params, min_samples=40, max_samples=40, rel_tol=1e-9)
    for name in params:
        assert abs(out[name].trace - exact[name]) < 4 * out[name].std_error, (name, out[name], exact[name])


def test_bn_running_stats_modes_and_global_rng_untouched() -> None:
    gen = torch.Generator().manual_seed(4)
    model = small_cnn(gen)
    model.train()
    model[3].eval()  # mixed modes must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    batches = image_batches([8], gen)
    for estimator in ESTIMATORS:
        run(estimator, model, batches, weight_params(model), min_samples=3, max_samples=3)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, b in model.named_buffers():
        assert b.dtype == buffers[name].dtype
        assert torch.equal(b, buffers[name]), name
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1])
    assert after[2] == np_state[2]
    assert all(p.grad is None for p in model.parameters())


def test_per_block_has_lower_variance_than_whole_model() -> None:
    gen = torch.Generator().manual_seed(5)
    model = small_cnn(gen)
    batches = image_batches([24], gen)
    params = weight_params(model)
    kw = {"min_samples": 60, "max_samples": 60, "rel_tol": 1e-9}
    block = run(hutchinson_traces, model, batches, params, **kw)
    whole = run(hutchinson_traces_whole_model, model, batches, params, **kw)
    for name in params:
        var_block = block[name].std_error ** 2 * block[name].num_samples
        var_whole = whole[name].std_error ** 2 * whole[name].num_samples
        assert var_block < var_whole, (name, var_block, var_whole)
        # both unbiased: they agree within their combined standard error
        se = math.hypot(block[name].std_error, whole[name].std_error)
        assert abs(block[name].trace - whole[name].trace) < 4 * se


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("c", [3.7, -2.0])
def test_scaling_the_loss_scales_the_traces(estimator: Callable, c: float) -> None:
    gen = torch.Generator().manual_seed(6)
    model = small_cnn(gen).double()  # float64: the whole-model estimate of a small trace cancels a lot
    batches = [(x.double(), y) for x, y in image_batches([8, 4], gen)]
    params = weight_params(model)
    base = run(estimator, model, batches, params, min_samples=4, max_samples=4)
    scaled = run(
        estimator, model, batches, params, min_samples=4, max_samples=4, loss_fn=lambda o, y: c * F.cross_entropy(o, y)
    )
    for name in params:
        assert scaled[name].trace == pytest.approx(c * base[name].trace, rel=1e-9)
        assert scaled[name].std_error == pytest.approx(abs(c) * base[name].std_error, rel=1e-9)
        assert scaled[name].normalized == pytest.approx(max(c * base[name].trace, 0.0) / base[name].numel, rel=1e-9)
        if c < 0 and base[name].trace > 0:
            assert scaled[name].trace < 0  # raw value kept
            assert scaled[name].normalized == 0.0  # clamped


def test_zero_hessian_block_converges_immediately() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.zero_()  # gamma = 0: the first block's Hessian is exactly zero
        model[1].bias.uniform_(0.5, 1.0)
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen))]
    params = weight_params(model)
    out = run(hutchinson_traces, model, batches, params, min_samples=4, max_samples=100, rel_tol=0.2)
    assert out["0.weight"].trace == 0.0
    assert out["0.weight"].std_error == 0.0
    assert out["0.weight"].num_samples == 4
    assert 4 <= out["3.weight"].num_samples < 100


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_stopping_rule(estimator: Callable) -> None:
    gen = torch.Generator().manual_seed(8)
    model = small_cnn(gen)
    batches = image_batches([8, 8], gen)
    params = weight_params(model)
    loose = run(estimator, model, batches, params, min_samples=5, max_samples=200, rel_tol=0.1)
    for t in loose.values():
        assert t.num_samples >= 5
        assert t.num_samples == 200 or t.std_error < 0.1 * abs(t.trace)
    tight = run(estimator, model, batches, params, min_samples=3, max_samples=7, rel_tol=1e-9)
    assert all(t.num_samples == 7 for t in tight.values())
    if estimator is hutchinson_traces_whole_model:  # lockstep: every layer has the same count
        assert len({t.num_samples for t in loose.values()}) == 1


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_deterministic_and_retain_graphs_equivalent(estimator: Callable) -> None:
    gen = torch.Generator().manual_seed(9)
    model = small_cnn(gen)
    batches = image_batches([6, 10], gen)
    params = weight_params(model)
    kw = {"min_samples": 3, "max_samples": 20, "rel_tol": 0.1}
    a = run(estimator, model, batches, params, seed=11, **kw)
    b = run(estimator, model, batches, params, seed=11, retain_graphs=True, **kw)
    c = run(estimator, model, batches, params, seed=12, **kw)
    for name in params:
        assert a[name].num_samples == b[name].num_samples
        assert a[name].trace == pytest.approx(b[name].trace, rel=1e-6)
    assert any(a[n].trace != c[n].trace for n in params)


def test_reduce_fn_is_applied_to_each_sample_vector() -> None:
    gen = torch.Generator().manual_seed(10)
    model = small_cnn(gen)
    batches = image_batches([8], gen)
    params = weight_params(model)
    seen: list[Tensor] = []

    def identity(t: Tensor) -> Tensor:
        seen.append(t.clone())
        return t

    kw = {"min_samples": 5, "max_samples": 5}
    base = run(hutchinson_traces, model, batches, params, **kw)
    same = run(hutchinson_traces, model, batches, params, reduce_fn=identity, **kw)
    doubled = run(hutchinson_traces, model, batches, params, reduce_fn=lambda t: 2 * t, **kw)
    assert len(seen) == 5
    assert all(t.shape == (len(params),) and t.dtype == torch.float64 for t in seen)
    for i, name in enumerate(params):
        assert same[name].trace == base[name].trace
        assert doubled[name].trace == pytest.approx(2 * base[name].trace, rel=1e-12)
        assert np.mean([float(t[i]) for t in seen]) == pytest.approx(base[name].trace, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"params": {}}, "params"),
        ({"batches": []}, "batches"),
        ({"min_samples": 0}, "min_samples"),
        ({"min_samples": 9, "max_samples": 8}, "max_samples"),
        ({"rel_tol": 0.0}, "rel_tol"),
        ({"params": {"frozen": torch.zeros(3)}}, "requires_grad"),
        ({"loss_fn": lambda o, y: F.cross_entropy(o, y, reduction="none")}, "scalar"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    args: dict = {
        "batches": [(torch.randn(4, 3), torch.randint(0, 2, (4,)))],
        "params": {"0.weight": model[0].weight},
        "progress": False,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hutchinson_traces(model, args.pop("batches"), args.pop("params"), **args)


def _ddp_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same model on every rank, different data shard
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        gen = torch.Generator().manual_seed(100 + rank)
        batches = [(torch.randn(10, 5, generator=gen), torch.randint(0, 3, (10,), generator=gen))]
        torch.manual_seed(1000 + rank)  # global RNG differs per rank: must not matter

        def average(t: Tensor) -> Tensor:
            t = t.clone()
            dist.all_reduce(t)
            return t / world

        out = hutchinson_traces(
            model, batches, weight_params(model), seed=rank, reduce_fn=average, max_samples=40, progress=False
        )
        torch.save({k: (v.trace, v.num_samples) for k, v in out.items()}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_ranks_agree() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        # fork: the children reuse the imported torch (spawn re-imports it: > 10 s on a busy 2-core box)
        mp.start_processes(_ddp_worker, args=(2, init_file, result_file), nprocs=2, join=True, start_method="fork")
        r0, r1 = torch.load(f"{result_file}.0"), torch.load(f"{result_file}.1")
    assert r0 == r1
    assert all(n >= 8 for _, n in r0.values())


def test_shard_batches_splits_images_equally_and_disjointly() -> None:
    from lightning_dbq.search.profile import shard_batches

    x = torch.arange(50, dtype=torch.float32).view(50, 1)
    batches = [(x[i : i + 16], x[i : i + 16, 0].long()) for i in range(0, 50, 16)]  # 16, 16, 16, 2
    shards = [shard_batches(batches, r, 3) for r in range(3)]
    seen = [torch.cat([b[0] for b in s]).view(-1).tolist() for s in shards]
    assert [len(s) for s in seen] == [16, 16, 16]  # 50 // 3 each, remainder dropped
    assert sorted(sum(seen, [])) == list(range(48))  # disjoint, contiguous, nothing repeated
    assert all(len(b[0]) <= 16 for s in shards for b in s)
    assert shard_batches(batches, 0, 1) == batches
    with pytest.raises(ValueError, match="cannot be shared"):
        shard_batches([(x[:1], x[:1, 0].long())], 0, 2)
    with pytest.raises(ValueError, match="rank"):
        shard_batches(batches, 3, 3)
