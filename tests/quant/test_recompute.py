"""What a quantized training step keeps for the backward (counted with saved-tensor hooks, not RSS), and that the
recomputed convolution gives the plain path's values bit for bit (docs/memory.md)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_dbq.quant.layers as layers_mod
from lightning_dbq import prepare, set_bits, set_kernel
from lightning_dbq.quant.fused import (
    double_round_window,
    fused_double_round_fake,
    fused_lsq_fake,
    lsq_window,
    operand_grads_,
    rebuild,
)
from lightning_dbq.quant.layers import make_quant_layer
from tests.helpers.tiny import TinyNet


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@contextmanager
def _saved_bytes(exclude: Callable[[], list[Tensor]]) -> Iterator[dict[str, int]]:
    """Bytes of the distinct storages autograd saves inside the block, leaving out the storages of ``exclude()``
    (read when the block ends: tensors kept anyway, such as the input, which the layer before saves)."""
    seen: dict[int, int] = {}
    counts = {"bytes": 0}

    def pack(t: Tensor) -> Tensor:
        seen.setdefault(_storage(t), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counts
    kept = {_storage(t) for t in exclude()}
    counts["bytes"] = sum(n for ptr, n in seen.items() if ptr not in kept)


@pytest.mark.parametrize("kind", ["lsq", "double_round"])
def test_fused_fake_quant_saves_no_full_size_tensor(kind: str) -> None:
    """Only ``x`` (kept by the layer before) and the scalar scale: before, the output (4 bytes per element) and
    a bool mask (1 byte) were saved too."""
    x = torch.randn(8, 16, 10, 10).relu().requires_grad_(True)
    h = x * 1.0  # a non-leaf input, as after a ReLU
    s = torch.tensor(0.1, requires_grad=True)
    with _saved_bytes(lambda: [h]) as saved:
        y = fused_lsq_fake(h, s * 1.0, 4, False, 0.1) if kind == "lsq" else fused_double_round_fake(h, s * 1.0, 8, 4)
    assert saved["bytes"] <= 4 * 4, saved  # scalars only (the scale), nothing per element
    before = 5 * h.numel()  # what the previous kernel saved on top: out (float32) + inside (bool)
    assert saved["bytes"] < before / 100
    y.sum().backward()
    assert x.grad is not None and s.grad is not None


def _layer(kernel: str, bias: bool = True, per_channel: bool = False) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=bias)
    layer = make_quant_layer(conv, [8, 4, 2], per_channel=per_channel, kernel=kernel)
    with torch.no_grad():
        layer(torch.rand(2, 8, 6, 6))  # initialise the activation scales
    layer.act_quant.active_bits = layer.weight_quant.active_bits = 4  # type: ignore[union-attr]
    return layer


@pytest.mark.parametrize("kernel", ["fused", "eager"])
def test_quantized_conv_saves_what_a_plain_conv_saves(kernel: str) -> None:
    """A quantized conv saves its unquantized input and latent weight (both kept anyway) and the scales: per
    element, as much as an FP32 conv (0 extra bytes); the plain path saved ``Q_a(x)`` and ``Q_w(W)`` as well
    (4 bytes per input element + 4 per weight, more with the eager kernel)."""
    layer = _layer(kernel)
    h = torch.rand(4, 8, 12, 12, requires_grad=True) * 1.0

    def kept() -> list[Tensor]:
        return [h, *layer.parameters()]

    with _saved_bytes(kept) as saved:
        y = layer(h)
    assert saved["bytes"] <= 16 * 4, saved  # the two scales (and their intermediates): scalars only
    plain = copy.deepcopy(layer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers_mod, "recomputable", lambda x, w: False)
        with _saved_bytes(lambda: [h, *plain.parameters()]) as saved_plain:
            plain(h)
    assert saved_plain["bytes"] >= 4 * (h.numel() + layer.weight.numel())  # what the recompute saves
    y.sum().backward()


def _plain_and_recomputed(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return copy.deepcopy(model), copy.deepcopy(model)


def _run(model: nn.Module, x: Tensor, y: Tensor, plain: bool) -> tuple[Tensor, dict[str, Tensor]]:
    with pytest.MonkeyPatch.context() as mp:
        if plain:
            mp.setattr(layers_mod, "recomputable", lambda x, w: False)
        out = model(x)
        F.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("kernel", ["fused", "eager"])
@pytest.mark.parametrize("mode", ["double_round", "floor", "unshared", "binary"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_recomputed_conv_matches_the_plain_path_bit_for_bit(kernel: str, mode: str, per_channel: bool) -> None:
    torch.manual_seed(0)
    bits = [1] if mode == "binary" else [8, 4, 2]
    model = prepare(TinyNet(), bits, kernel=kernel, weight_mode=mode, per_channel=per_channel)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    model(x)  # initialise the activation scales
    set_bits(model, bits[-1] if mode == "binary" else 2)
    a, b = _plain_and_recomputed(model)
    out_a, grads_a = _run(a, x, y, plain=True)
    out_b, grads_b = _run(b, x, y, plain=False)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) >= 10
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("per_channel", [False, True])
def test_recomputed_conv_with_compiled_kernels_is_the_fused_one(per_channel: bool) -> None:
    """The compiled back-end's recompute (its inference graph rebuilds the operands, its closed-form gradient graphs
    differentiate them) gives the fused kernel's output and every gradient but the quantizer scales' bit for bit
    (same operands, same ``dL/dx = dL/dy · inside``); the scales' gradients up to float32 summation order. The
    compiled plain path (autograd of the compiled training graph) agrees to float32 rounding."""
    torch.manual_seed(0)
    model = prepare(TinyNet(), [8, 4, 2], kernel="fused", per_channel=per_channel)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    model(x)  # initialise the activation scales
    set_bits(model, 2)
    fused = copy.deepcopy(model)
    compiled = set_kernel(copy.deepcopy(model), "compile")
    plain = set_kernel(copy.deepcopy(model), "compile")
    out_f, grads_f = _run(fused, x, y, plain=False)
    out_c, grads_c = _run(compiled, x, y, plain=False)
    out_p, grads_p = _run(plain, x, y, plain=True)
    assert torch.equal(out_f, out_c) and torch.equal(out_c, out_p)
    assert grads_f.keys() == grads_c.keys() == grads_p.keys()
    scales = [n for n in grads_c if n.endswith(("weight_quant.scale", ".act_quant.scales.2"))]
    assert len(scales) >= 4
    for name, g in grads_c.items():
        if name in scales:
            torch.testing.assert_close(g, grads_f[name], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(g, grads_f[name]), name
        torch.testing.assert_close(g, grads_p[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1),
        lambda: nn.Conv2d(6, 12, 3, padding=2, dilation=2, groups=3, bias=False),
        lambda: nn.Conv2d(6, 8, 1, stride=2),
        lambda: nn.Conv3d(6, 4, 3, padding=1),
    ],
)
def test_recomputed_conv_geometries(conv: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    layer = make_quant_layer(conv(), [8, 4], kernel="fused")
    dims = layer.weight.dim() - 2
    x = torch.randn((3, 6) + (7,) * dims)
    with torch.no_grad():
        layer(x)
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers_mod, "recomputable", lambda x, w: False)
        ya = a(xa)
        ya.square().sum().backward()
    yb = b(xb)
    yb.square().sum().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), name


def test_recompute_uses_the_bits_of_the_forward_and_double_backward_matches() -> None:
    """A bit switch between forward and backward does not change what is rebuilt; Hessian-vector products
    (``create_graph=True``) through the recomputed conv equal the plain path's."""
    layer = _layer("fused")
    x = torch.rand(4, 8, 6, 6)
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    ya = a(x)
    b.act_quant.active_bits = b.weight_quant.active_bits = 4  # type: ignore[union-attr]
    yb = b(x)
    b.act_quant.active_bits = b.weight_quant.active_bits = 2  # type: ignore[union-attr]
    ya.square().sum().backward()
    yb.square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert (pa.grad is None) == (pb.grad is None)
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad)

    def hvp(m: nn.Module, plain: bool) -> Tensor:
        with pytest.MonkeyPatch.context() as mp:
            if plain:
                mp.setattr(layers_mod, "recomputable", lambda x, w: False)
            xin = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(m(xin).square().sum(), m.weight, create_graph=True)
            (h,) = torch.autograd.grad(g, m.weight, grad_outputs=torch.ones_like(g))
        return h

    layer.act_quant.active_bits = layer.weight_quant.active_bits = 4  # type: ignore[union-attr]
    torch.testing.assert_close(hvp(layer, plain=False), hvp(layer, plain=True), rtol=1e-6, atol=1e-9)


def test_inplace_change_of_the_input_is_caught_and_checkpointing_still_recomputes() -> None:
    layer = _layer("fused")
    h = torch.rand(2, 8, 6, 6, requires_grad=True) * 1.0
    y = layer(h)
    with torch.no_grad():
        h.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # torch.utils.checkpoint sees the node's saved tensors like any other: same gradients, nothing kept
    x = torch.rand(2, 8, 6, 6)
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    a(x).square().sum().backward()
    checkpointed = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
    checkpointed.square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad)


def test_plain_path_without_grad_under_autocast_and_for_string_padding() -> None:
    """Where the recompute does not apply, the layer runs its plain forward (same values)."""
    layer = _layer("fused")
    x = torch.rand(2, 8, 6, 6)
    from lightning_dbq.quant.recompute import conv_geometry, recomputable

    assert recomputable(x, layer.weight)
    with torch.no_grad():
        assert not recomputable(x, layer.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not recomputable(x, layer.weight)
        assert layer(x).dtype == torch.bfloat16
    assert conv_geometry(nn.Conv2d(2, 2, 3, padding="same")) is None
    assert conv_geometry(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")) is None
    assert conv_geometry(nn.Linear(2, 2)) is None
    assert conv_geometry(nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)) == ((2, 2), (1, 1), (1, 1), 2)


@pytest.mark.parametrize("kind", ["lsq_signed", "lsq_unsigned", "double_round"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_closed_form_backward_is_the_fused_backward(kind: str, per_channel: bool, needs: tuple[bool, bool]) -> None:
    """``rebuild`` gives the fused forward and ``operand_grads_`` the fused gradients bit for bit, in place in the
    incoming gradient, at grid points, rounding ties and the clip bounds too."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 4, 4, generator=gen) * 2
    s = torch.rand((6, 1, 1, 1) if per_channel else (), generator=gen) * 0.05 + 0.01
    s0 = float(s.reshape(-1)[0])
    flat = x.view(-1)
    flat[:30] = (torch.arange(30, dtype=torch.float32) - 15) * 0.5 * s0  # ties and grid points
    flat[30:40] = torch.tensor([-128, 127, 128, -129, 255, 256, 0, -8, 7, 15], dtype=torch.float32) * s0
    g = 0.37
    if kind == "double_round":
        window, fn = double_round_window(8, 3, g), lambda a, b: fused_double_round_fake(a, b, 8, 3, g)
    else:
        window = lsq_window(4, kind == "lsq_signed", g)
        fn = lambda a, b: fused_lsq_fake(a, b, 4, kind == "lsq_signed", g)  # noqa: E731
    xa, sa = x.clone().requires_grad_(needs[0]), s.clone().requires_grad_(needs[1])
    gy = torch.randn(x.shape, generator=gen)
    ya = fn(xa, sa)
    ya.backward(gy)
    y, inside = rebuild(x, s, window)
    assert torch.equal(y, ya.detach())
    v = (x / s).double()
    assert torch.equal(inside, (v > window.lo) & (v < window.hi))
    grad = gy.clone()
    gx, gs = operand_grads_(grad, y, inside, x, s, window, needs)
    assert (gx is None) != needs[0] and (gs is None) != needs[1]
    if gx is not None:
        assert torch.equal(gx, xa.grad) and gx.data_ptr() == grad.data_ptr()  # written into the incoming gradient
    if gs is not None:
        assert gs.shape == s.shape and torch.equal(gs, sa.grad)
