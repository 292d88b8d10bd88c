"""Fake-quant back-ends: the fused autograd.Function (and torch.compile) against the composite reference and a
float64 NumPy reference of the forward and of the STE gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_dbq import prepare, set_bits, set_kernel
from lightning_dbq.quant.functional import double_round_fake, double_round_grads, lsq_fake, lsq_grads, qrange
from lightning_dbq.quant.fused import fused_double_round_fake, fused_lsq_fake
from lightning_dbq.quant.kernels import KERNELS, Kernels, kernels
from lightning_dbq.search.hessian import hutchinson_traces
from tests.helpers.tiny import TinyNet


def _numpy_reference(x: np.ndarray, s: np.ndarray, lo: float, hi: float, step: float, g: float, gy: np.ndarray):
    """Forward ``s·step·rhu(rhu(clamp(x/s))/step)`` and STE gradients (s broadcast to x).

    ``v = x / s`` is divided in float32, as the kernels do (a float64 quotient can fall on the other side of a
    rounding tie); everything after it is exact or float64.
    """
    v = (x.astype(np.float32) / s.astype(np.float32)).astype(np.float64)
    c = np.clip(v, lo, hi)
    q = np.floor(np.floor(c + 0.5) / step + 0.5) * step
    inside = (v > lo) & (v < hi)
    gx = gy * inside
    gs_elem = gy * np.where(inside, q - v, q) * g
    slack = np.abs(gy) * g * (np.abs(v) + np.abs(q)) * 2.0**-22
    return q * s, gx, gs_elem, slack


def _assert_scale_grad(scales: list[torch.Tensor], terms: np.ndarray, slack: np.ndarray) -> None:
    """Both kernels' scale gradients equal the float64 sum of the per-element terms (one row per scale) up to
    float32 error: ``q − v`` is formed from float32 numbers of size ``|v|`` (error ≲ 2 ulp(v) per term, given
    per element in ``slack``) and then summed (≲ 1e-6 · Σ|term|). The sums cancel heavily: no relative bound."""
    expect = terms.sum(1)
    bound = 1e-6 * np.abs(terms).sum(1) + slack.sum(1) + 1e-12
    for s in scales:
        got = s.grad.double().numpy().reshape(-1)
        assert np.all(np.abs(got - expect) <= bound), (got, expect, bound)


def _case(shape: tuple[int, ...], per_channel: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2
    s = torch.rand((shape[0],) + (1,) * (len(shape) - 1) if per_channel else (), generator=gen) * 0.05 + 0.01
    # put some inputs exactly on grid points, ties and the clip bounds (where the masks are decided)
    flat = x.view(-1)
    flat[:40] = (torch.arange(40, dtype=torch.float32) - 20) * 0.5 * s.reshape(-1)[0]
    bounds = torch.tensor([-128, 127, 124, 112, 96, 64, -8, 7, -2, 1, 255, 15, 3], dtype=torch.float32)
    flat[40 : 40 + len(bounds)] = bounds * s.reshape(-1)[0]
    return x, s


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
def test_fused_double_round_matches_composite_and_numpy(bits: int, per_channel: bool) -> None:
    x, s = _case((6, 5, 3, 3), per_channel, seed=bits)
    g = 0.37
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ss = [s.clone().requires_grad_(True) for _ in range(2)]
    y_ref = double_round_fake(xs[0], ss[0], 8, bits, g)
    y_fused = fused_double_round_fake(xs[1], ss[1], 8, bits, g)
    assert torch.equal(y_ref, y_fused)  # bit-identical forward
    gy = torch.randn_like(x)
    y_ref.backward(gy)
    y_fused.backward(gy)
    # the composite chain computes (step·s)·(1/step)·(1/s) in float32: the fused mask is the exact STE gradient
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-6, atol=0)
    step = float(1 << (8 - bits))
    lo, hi = qrange(bits, signed=True)
    s64 = np.broadcast_to(s.double().numpy(), x.shape)
    ref = _numpy_reference(x.double().numpy(), s64, lo * step, hi * step, step, g, gy.double().numpy())
    y_np, gx_np, gs_elem, slack = ref
    np.testing.assert_allclose(y_fused.detach().double().numpy(), y_np, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(xs[1].grad.numpy(), gx_np.astype(np.float32))
    rows = x.shape[0] if per_channel else 1
    _assert_scale_grad(ss, gs_elem.reshape(rows, -1), slack.reshape(rows, -1))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fused_lsq_matches_composite_and_numpy(bits: int, signed: bool) -> None:
    x, s = _case((16, 8, 4, 4), per_channel=False, seed=10 + bits)
    if not signed:
        x = x.relu()
    g = 0.05
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ss = [s.clone().requires_grad_(True) for _ in range(2)]
    y_ref = lsq_fake(xs[0], ss[0], bits, signed, g)
    y_fused = fused_lsq_fake(xs[1], ss[1], bits, signed, g)
    assert torch.equal(y_ref, y_fused)
    gy = torch.randn_like(x)
    y_ref.backward(gy)
    y_fused.backward(gy)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-6, atol=0)
    lo, hi = qrange(bits, signed)
    ref = _numpy_reference(x.double().numpy(), s.double().numpy(), lo, hi, 1.0, g, gy.double().numpy())
    y_np, gx_np, gs_elem, slack = ref
    np.testing.assert_allclose(y_fused.detach().double().numpy(), y_np, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(xs[1].grad.numpy(), gx_np.astype(np.float32))
    _assert_scale_grad(ss, gs_elem.reshape(1, -1), slack.reshape(1, -1))


def _closed_form(kind: str, bits: int, grads_of: Kernels | None = None):
    """``(fused fake-quant, closed-form gradients, lo, hi, step)`` of one quantizer (``kind``: lsq_signed,
    lsq_unsigned, double_round from 8 bits); the gradients of ``grads_of`` (a back-end) or the eager functions."""
    lsq_g = lsq_grads if grads_of is None else grads_of.lsq_grads
    dr_g = double_round_grads if grads_of is None else grads_of.double_round_grads
    assert lsq_g is not None and dr_g is not None
    if kind == "double_round":
        step = 1 << (8 - bits)
        lo, hi = qrange(bits, signed=True)
        return (lambda x, s, g: fused_double_round_fake(x, s, 8, bits, g),
                lambda gy, x, s, g: dr_g(gy, x, s, 8, bits, g), lo * step, hi * step, step)  # fmt: skip
    signed = kind == "lsq_signed"
    lo, hi = qrange(bits, signed)
    return (lambda x, s, g: fused_lsq_fake(x, s, bits, signed, g),
            lambda gy, x, s, g: lsq_g(gy, x, s, bits, signed, g), lo, hi, 1)  # fmt: skip


def _check_closed_form_grads(kind: str, bits: int, per_channel: bool, grads_of: Kernels | None = None) -> None:
    x, s = _case((6, 5, 3, 3), per_channel, seed=20 + bits)
    if kind == "lsq_unsigned":
        x = x.relu()
    fused, grads, lo, hi, step = _closed_form(kind, bits, grads_of)
    g = 0.37
    gy = torch.randn_like(x)
    xa, sa = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fused(xa, sa, g).backward(gy)
    gx, gs = grads(gy, x, s, g)
    assert gx.shape == x.shape and gs.shape == s.shape
    assert torch.equal(gx, xa.grad)  # the fused kernel's input gradient bit for bit
    s64 = np.broadcast_to(s.double().numpy(), x.shape)
    _, gx_np, gs_elem, slack = _numpy_reference(x.double().numpy(), s64, lo, hi, step, g, gy.double().numpy())
    np.testing.assert_array_equal(gx.numpy(), gx_np.astype(np.float32))
    rows = x.shape[0] if per_channel else 1
    got = s.clone()
    got.grad = gs
    _assert_scale_grad([got, sa], gs_elem.reshape(rows, -1), slack.reshape(rows, -1))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("kind", "bits"), [("lsq_signed", 4), ("lsq_unsigned", 2), ("lsq_signed", 8),
                                            ("double_round", 8), ("double_round", 4), ("double_round", 2)])  # fmt: skip
def test_closed_form_gradients_match_numpy_and_the_fused_kernel(kind: str, bits: int, per_channel: bool) -> None:
    """``lsq_grads`` / ``double_round_grads`` (what the compiled back-end's backward runs): the input gradient is the
    fused kernel's bit for bit and the NumPy reference's; the scale gradient the float64 sum up to float32 error, at
    grid points, rounding ties and the clip bounds too."""
    _check_closed_form_grads(kind, bits, per_channel)


def test_fused_keeps_input_dtype_and_rejects_bad_bits() -> None:
    x = torch.randn(4, 4, dtype=torch.bfloat16)
    assert fused_lsq_fake(x, torch.tensor(0.1), 4, True).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bits must be in"):
        fused_lsq_fake(x, torch.tensor(0.1), 9, True)
    with pytest.raises(ValueError, match="bits must satisfy"):
        fused_double_round_fake(x, torch.tensor(0.1), 4, 6)


def _pair(kernel_a: str, kernel_b: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = prepare(TinyNet(), [8, 4, 2], kernel=kernel_a)
    b = set_kernel(copy.deepcopy(a), kernel_b)
    return a, b


def test_models_on_fused_and_eager_kernels_train_alike() -> None:
    a, b = _pair("eager", "fused")
    assert "kernel='fused'" in repr(b) and "kernel='eager'" in repr(a)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for bits in (8, 4, 2):
        set_bits(a, bits)
        set_bits(b, bits)
        out_a, out_b = a(x), b(x)
        assert torch.equal(out_a, out_b)
        F.cross_entropy(out_a, y).backward()
        F.cross_entropy(out_b, y).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hessian_traces_through_fused_kernels_match_eager() -> None:
    a, b = _pair("eager", "fused")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 4, (16,), generator=gen))]
    for m in (a, b):
        m(batches[0][0])  # initialise the activation scales identically
        set_bits(m, 4)
    kw = {"min_samples": 4, "max_samples": 4, "progress": False}
    ta = hutchinson_traces(a, batches, {"conv2": a.conv2.weight, "conv3": a.conv3.weight}, **kw)
    tb = hutchinson_traces(b, batches, {"conv2": b.conv2.weight, "conv3": b.conv3.weight}, **kw)
    for name in ("conv2", "conv3"):
        assert ta[name].trace != 0.0
        assert tb[name].trace == pytest.approx(ta[name].trace, rel=1e-4)


def test_set_kernel_and_prepare_reject_unknown_backend() -> None:
    with pytest.raises(
        ValueError, match=r"`kernel` must be one of \('fused', 'eager', 'compile', 'auto'\), got 'cuda'"
    ):
        prepare(TinyNet(), [8, 4], kernel="cuda")
    model = prepare(TinyNet(), [8, 4])
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        set_kernel(model, "triton")
    with pytest.raises(ValueError, match="not prepared|prepare"):
        set_kernel(TinyNet(), "eager")
    assert "auto" in KERNELS and model.conv2.weight_quant.kernel == "auto"  # the default
    assert model.conv2.act_quant is not None and model.conv2.act_quant.kernel == "auto"


@pytest.mark.slow
def test_compiled_kernels_match_eager() -> None:
    """torch.compile back-end (needs a C++ compiler on CPU; ~30-60 s of compilation, so only on request)."""
    compiled = kernels("compile")
    act, weight = compiled.lsq, compiled.double_round
    x, s = _case((6, 5, 3, 3), per_channel=True, seed=3)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ss = [s.clone().requires_grad_(True) for _ in range(2)]
    y_ref = double_round_fake(xs[0], ss[0], 8, 2, 0.3)
    y_c = weight(xs[1], ss[1], 8, 2, 0.3)
    assert torch.equal(y_ref, y_c)
    gy = torch.randn_like(x)
    y_ref.backward(gy)
    y_c.backward(gy)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(ss[1].grad, ss[0].grad, rtol=1e-5, atol=1e-7)
    for kind, bits in (("lsq_unsigned", 4), ("lsq_signed", 2), ("double_round", 8), ("double_round", 2)):
        for per_channel in (False, True):  # the compiled gradient graphs, through the flattening wrapper
            _check_closed_form_grads(kind, bits, per_channel, compiled)
    a, b = _pair("eager", "compile")
    inp = torch.randn(4, 3, 16, 16)
    set_bits(a, 2)
    set_bits(b, 2)
    assert torch.equal(a(inp), b(inp))
    assert torch.equal(lsq_fake(x, s.view(-1)[0], 4, True), act(x, s.view(-1)[0], 4, True))
    torch.manual_seed(0)
    unshared = prepare(TinyNet(), [8, 4, 2], weight_mode="unshared", kernel="eager")  # weights go through `act`
    unshared_c = set_kernel(copy.deepcopy(unshared), "compile")
    for bits in (8, 2):
        set_bits(unshared, bits)
        set_bits(unshared_c, bits)
        assert torch.equal(unshared(inp), unshared_c(inp))


def test_whole_model_capture_of_fused_layers_has_no_graph_break() -> None:
    """``torch.compile(model, fullgraph=True)`` raises on any graph break (a ``float(tensor)`` in a kernel was one
    per quantizer); the "eager" backend keeps the check fast and free of a C++ toolchain."""
    torch.manual_seed(0)
    model = prepare(TinyNet(), bits=[8, 4, 2])
    x = torch.randn(4, 3, 8, 8)
    model(x)
    set_bits(model, 4)
    reference = copy.deepcopy(model)
    out = torch.compile(model, fullgraph=True, backend="eager")(x)
    out.sum().backward()
    ref = reference(x)
    ref.sum().backward()
    assert torch.equal(out.detach(), ref.detach())
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters(), strict=True)]
    assert sum(g is not None for g, _ in grads) >= 6 and all((g is None) == (r is None) for g, r in grads)
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in grads if g is not None and r is not None)


def test_auto_kernel_falls_back_to_fused_and_says_why(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A probe that cannot compile (here: torch.compile raises as without a C++ toolchain) picks "fused", logged."""
    import lightning_dbq.quant.kernels as kmod

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no working C++ compiler found\nsecond line")

    monkeypatch.setattr(kmod, "_AUTO", {})
    monkeypatch.delenv(kmod.AUTO_ENV, raising=False)
    monkeypatch.setattr(kmod.torch, "compile", broken)
    with caplog.at_level("INFO", logger="lightning_dbq.quant.kernels"):
        assert kernels("auto", "cpu") is kernels("fused")
    choice, reason = kmod.auto_choice("cpu")
    assert choice == "fused" and "RuntimeError: no working C++ compiler found" in reason and "second" not in reason
    assert caplog.text.count("kernel='auto' on cpu: fused") == 1  # probed and logged once
    torch.manual_seed(0)
    auto = prepare(TinyNet(), [8, 4, 2], kernel="auto")
    fused = set_kernel(copy.deepcopy(auto), "fused")
    x = torch.randn(2, 3, 8, 8)
    for bits in (8, 2):
        set_bits(auto, bits)
        set_bits(fused, bits)
        assert torch.equal(auto(x), fused(x))


def test_auto_kernel_never_probes_inside_a_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_dbq.quant.kernels as kmod

    monkeypatch.setattr(kmod, "_AUTO", {})
    monkeypatch.delenv(kmod.AUTO_ENV, raising=False)
    monkeypatch.setattr(kmod.torch.compiler, "is_compiling", lambda: True)
    assert kernels("auto", "cpu") is kernels("fused") and kmod._AUTO == {}


def test_auto_kernel_env_override_replaces_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_dbq.quant.kernels as kmod

    def must_not_probe(device_type: str) -> tuple[str, str]:
        raise AssertionError("probed despite DBQ_KERNEL_AUTO")

    monkeypatch.setattr(kmod, "_probe_compile", must_not_probe)
    for value in ("fused", "eager"):
        monkeypatch.setattr(kmod, "_AUTO", {})
        monkeypatch.setenv(kmod.AUTO_ENV, value)
        assert kmod.auto_choice("cpu") == (value, f"DBQ_KERNEL_AUTO={value} in the environment")
        assert kernels("auto", "cpu") is kernels(value)
    monkeypatch.setattr(kmod, "_AUTO", {})
    monkeypatch.setenv(kmod.AUTO_ENV, "fast")
    with pytest.raises(ValueError, match=r"DBQ_KERNEL_AUTO: got 'fast'; allowed: 'fused', 'eager', 'compile'"):
        kmod.auto_choice("cpu")


@pytest.mark.slow
def test_auto_kernel_probe_on_this_machine() -> None:
    """The real probe (compiles: slow): a choice with a reason; "compile" only if compiled kernels match eager."""
    import lightning_dbq.quant.kernels as kmod

    choice, reason = kmod._probe_compile("cpu")
    assert choice in ("compile", "fused") and "cpu" in reason
    if choice == "compile":
        x, s = _case((6, 5, 3, 3), per_channel=False, seed=1)
        assert torch.equal(kernels("compile").lsq(x, s.view(-1)[0], 4, True), lsq_fake(x, s.view(-1)[0], 4, True))
