"""Binary mode (``weight_mode="binary"``, ``bits=[1]``): XNOR-style weights, binary activations, straight-through
gradients, 1-bit packing, artifact / load_int / freeze / ONNX parity, and that it learns.

References are independent NumPy computations in float64; comparisons leave out elements within 1e-6 of a
rounding or sign boundary, so no test hinges on one CPU's float rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import lightning_dbq as dbq
import lightning_dbq.models  # noqa: F401  (registers cifar_resnet20)
from lightning_dbq.quant.binary import BinaryActQuantizer, BinaryWeightQuantizer
from lightning_dbq.quant.convert import WEIGHT_SCALE_ATTR
from lightning_dbq.quant.frozen import FrozenActQuant, FrozenSignAct
from lightning_dbq.quant.functional import binary_act_fake, binary_weight_fake
from lightning_dbq.quant.layers import iter_quantizers
from lightning_dbq.quant.packing import pack_codes, pack_width, unpack_codes
from lightning_dbq.quant.quantizers import ActQuantizer
from tests.reliability.helpers import read, resign

TIE = 1e-6


def _np_binary(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 reference: per output channel centre (mean, clipped to [min, max]), alpha = mean|W - mu|, Ŵ."""
    flat = w.astype(np.float64).reshape(w.shape[0], -1)
    center = np.clip(flat.mean(1), flat.min(1), flat.max(1))[:, None]
    alpha = np.abs(flat - center).mean(1)[:, None]
    out = alpha * np.where(flat - center >= 0, 1.0, -1.0)
    return center, alpha, out.reshape(w.shape)


# ------------------------------------------------------------------ forward against NumPy


def test_binary_weight_forward_matches_numpy() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3) * 0.05 + 0.01
    q = BinaryWeightQuantizer(w, [1])
    center, alpha, want = _np_binary(w.numpy())
    d = w.numpy().astype(np.float64).reshape(6, -1) - center
    away = (np.abs(d) > TIE).reshape(w.shape)
    assert away.mean() > 0.99
    out_train = q.train()(w).detach()
    assert np.allclose(out_train.numpy()[away], want[away], rtol=1e-5, atol=0)
    assert np.allclose(q.alpha.reshape(-1).numpy(), alpha.reshape(-1), rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(q.eval()(w), out_train)  # eval uses the alpha the training forward stored
    assert set(np.unique(q.codes(w).numpy())) == {-1, 1}
    assert q.alpha.shape == (6, 1, 1, 1)


@pytest.mark.parametrize("signed", [False, True])
def test_binary_act_forward_matches_numpy(signed: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    x = x if signed else x.relu()
    s = torch.tensor(0.7)
    out = binary_act_fake(x, s, signed).numpy()
    v = x.numpy().astype(np.float64) / 0.7
    if signed:
        want, away = 0.7 * np.where(v >= 0, 1.0, -1.0), np.abs(v) > TIE
    else:
        want, away = 0.7 * np.clip(np.floor(v + 0.5), 0, 1), np.abs(v - 0.5) > TIE
    assert np.allclose(out[away], want[away], rtol=1e-6, atol=0)
    assert set(np.unique(out)) <= ({-0.7, 0.7} if signed else {0.0, 0.7}) | {np.float32(0.7), np.float32(-0.7)}


def test_act_quantizer_picks_the_sign_and_scale_from_the_first_batch() -> None:
    unsigned, signed = BinaryActQuantizer([1]), BinaryActQuantizer([1])
    x = torch.randn(8, 16)
    unsigned(x.relu())
    signed(x)
    assert not bool(unsigned.signed) and bool(signed.signed)
    assert unsigned.scales["1"].item() == pytest.approx(2 * x.relu().abs().mean().item(), rel=1e-5)  # LSQ at 1 bit
    assert signed.scales["1"].item() == pytest.approx(x.abs().mean().item(), rel=1e-5)  # least squares of s·sign
    with pytest.raises(ValueError, match=r"BinaryActQuantizer needs bits=\[1\]"):
        BinaryActQuantizer([2])
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\], got \[1\]; 1-bit activations come with"):
        ActQuantizer([1])


def test_an_eval_mode_first_batch_initialises_provisionally() -> None:
    """Lightning's sanity-check validation runs before the first step, with BatchNorm's initial running stats:
    the first training batch initialises the binary activation scale again."""
    q = BinaryActQuantizer([1])
    q.eval()(torch.rand(4, 10) * 100.0)
    assert q.scales["1"].item() > 50.0
    x = torch.rand(4, 10)
    q.train()(x)
    assert q.scales["1"].item() == pytest.approx(2 * x.mean().item(), rel=1e-5)
    q.train()(x * 100.0)
    assert q.scales["1"].item() == pytest.approx(2 * x.mean().item(), rel=1e-5)  # only once


# ------------------------------------------------------------------ straight-through gradients


def test_weight_ste_is_zero_outside_the_window() -> None:
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(4, 50, generator=g) * 0.05).requires_grad_(True)
    center, alpha, _ = _np_binary(w.detach().numpy())
    a, c = torch.tensor(alpha, dtype=torch.float32), torch.tensor(center, dtype=torch.float32)
    gy = torch.randn(4, 50, generator=g)
    (binary_weight_fake(w, a, c) * gy).sum().backward()
    u = np.abs(w.detach().numpy() - center) / alpha
    inside, outside = u < 1 - 1e-4, u > 1 + 1e-4
    assert inside.sum() > 50 and outside.sum() > 20  # both cases are exercised
    assert np.allclose(w.grad.numpy()[inside], gy.numpy()[inside], rtol=1e-6, atol=0)  # gy·alpha/alpha
    assert np.all(w.grad.numpy()[outside] == 0)


def test_training_gradient_reaches_outside_weights_only_through_alpha() -> None:
    """Training mode: alpha = mean|W - mu| carries XNOR-Net's gradient; a weight outside the window gets only
    sign(W_i - mu)/n · Σ_j dL/dŴ_j · (sign_j - u_j·inside_j) (NumPy, per channel)."""
    g = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(3, 40, generator=g) * 0.05)
    q = BinaryWeightQuantizer(w.detach(), [1]).train()
    gy = torch.randn(3, 40, generator=g)
    (q(w) * gy).sum().backward()
    center, alpha, _ = _np_binary(w.detach().numpy())
    d = w.detach().numpy().astype(np.float64) - center
    u, sign, gyn = d / alpha, np.where(d >= 0, 1.0, -1.0), gy.numpy().astype(np.float64)
    inside = np.abs(u) <= 1
    dalpha = (gyn * (sign - u * inside)).sum(1, keepdims=True)
    want = sign / d.shape[1] * dalpha + gyn * inside
    clear = np.abs(np.abs(u) - 1) > 1e-4
    assert np.allclose(w.grad.numpy()[clear], want[clear], rtol=1e-4, atol=1e-6)
    # eval mode with grad enabled uses the stored alpha: no alpha path, zero outside the window
    w.grad = None
    (q.eval()(w) * gy).sum().backward()
    assert np.all(w.grad.numpy()[(np.abs(u) > 1 + 1e-4)] == 0)


@pytest.mark.parametrize("signed", [False, True])
def test_act_ste_and_scale_gradient_match_numpy(signed: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 200, generator=gen) * 1.5
    x = (x if signed else x.relu()).requires_grad_(True)
    s = torch.tensor(0.8, requires_grad=True)
    gy = torch.randn(2, 200, generator=gen)
    (binary_act_fake(x, s, signed, g=0.3) * gy).sum().backward()
    v = x.detach().numpy().astype(np.float64) / 0.8
    lo = -1.0 if signed else 0.0
    inside = (v >= lo) & (v <= 1)
    q = np.where(v >= 0, 1.0, -1.0) if signed else np.clip(np.floor(v + 0.5), 0, 1)
    clear = (np.abs(v - 1) > 1e-4) & (np.abs(v - lo) > 1e-4) & (np.abs(v - (0 if signed else 0.5)) > 1e-4)
    gyn = gy.numpy().astype(np.float64)
    assert np.allclose(x.grad.numpy()[clear], np.where(inside, gyn, 0.0)[clear], rtol=1e-6, atol=0)
    want_s = 0.3 * (gyn * np.where(inside, q - v, q)).sum()
    assert float(s.grad) == pytest.approx(want_s, rel=1e-4)
    outside = clear & ~inside
    assert outside.sum() > 20 and np.all(x.grad.numpy()[outside] == 0)


# ------------------------------------------------------------------ packing


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_one_bit_packing_matches_numpy_packbits(n: int) -> None:
    rng = np.random.default_rng(n)
    codes = rng.choice(np.array([-1, 1], dtype=np.int8), size=n)
    packed = pack_codes(torch.from_numpy(codes), 1)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert np.array_equal(packed.numpy(), np.packbits(codes > 0, bitorder="little"))
    assert np.array_equal(unpack_codes(packed, 1, n).numpy(), codes)
    assert pack_width(1) == 1


def test_one_bit_codes_must_be_signs() -> None:
    with pytest.raises(ValueError, match="1-bit codes must be signs"):
        pack_codes(torch.tensor([1, 0, -1]), 1)


# ------------------------------------------------------------------ artifact, load_int, freeze


class SignedNet(nn.Module):
    """conv (FP) → binary conv on *signed* input → bn/relu → binary conv (unsigned input) → binary linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_s = nn.Conv2d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.conv_u = nn.Conv2d(12, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv_s(self.stem(x))))
        return self.fc(F.relu(self.conv_u(x)).mean(dim=(2, 3)))


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """A few Adam steps so that scales and alphas differ from their initial values, then eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model.train()(x).square().mean().backward()
        opt.step()
    model.train()(x)  # the alphas of the last weights
    return model.eval()


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = dbq.prepare(SignedNet(), bits=[1], weight_mode="binary", quantize_last=True)
    x = torch.randn(6, 3, 8, 8)
    return _trained(model, x), x


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = dbq.create_model("cifar_resnet20", bits=[1], quant={"weight_mode": "binary"}, num_classes=10)
    x = torch.randn(4, 3, 16, 16)
    return _trained(model, x, steps=2), x


def test_signed_and_unsigned_inputs_both_occur(small: tuple[nn.Module, torch.Tensor]) -> None:
    model, _ = small
    signs = {q.name: bool(q.act_quant.signed) for q in iter_quantizers(model)}
    assert signs == {"conv_s": True, "conv_u": False, "fc": False}


@pytest.mark.parametrize("which", ["small", "resnet"])
def test_artifact_load_int_and_freeze_reproduce_the_model(which: str, request, tmp_path: Path) -> None:
    model, x = request.getfixturevalue(which)
    with torch.no_grad():
        want = model(x)
    kw = {"model_name": "cifar_resnet20"} if which == "small" else {}
    path = dbq.save_int(model, tmp_path / "b.dbq.safetensors", **kw)
    manifest = dbq.read_manifest(path)
    assert manifest["spec"]["weight_mode"] == "binary" and manifest["bits"] == [1]
    assert {layer["storage_bits"] for layer in manifest["layers"]} == {1}
    with safe_open(str(path), framework="pt") as f:
        for layer in manifest["layers"]:
            packed = f.get_tensor(f"__codes__.{layer['name']}.weight")
            assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(layer["numel"] / 8)
    loaded = dbq.load_int(path, model=SignedNet() if which == "small" else None)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    frozen = dbq.freeze(model, 1)
    with torch.no_grad():
        assert torch.equal(frozen(x), want)
    for q in iter_quantizers(model):
        layer = frozen.get_submodule(q.name)
        conv = getattr(layer, "layer", layer)
        codes = conv.weight / getattr(conv, WEIGHT_SCALE_ATTR)
        assert set(codes.unique().tolist()) <= {-1.0, 1.0}
        assert torch.equal(getattr(conv, WEIGHT_SCALE_ATTR), q.weight_quant.alpha)
        kind = FrozenSignAct if bool(q.act_quant.signed) else FrozenActQuant
        assert type(layer.act_quant) is kind


def test_one_configuration_artifact_of_a_binary_model(small: tuple[nn.Module, torch.Tensor], tmp_path: Path) -> None:
    model, x = small
    path = dbq.save_int(model, tmp_path / "c.dbq.safetensors", model_name="cifar_resnet20", bits=1)
    assert {layer["code_bits"] for layer in dbq.read_manifest(path)["layers"]} == {1}
    with torch.no_grad():
        assert torch.equal(dbq.load_int(path, model=SignedNet())(x), model(x))


def test_a_zero_alpha_is_refused(small: tuple[nn.Module, torch.Tensor], tmp_path: Path) -> None:
    model, _ = small
    path = dbq.save_int(model, tmp_path / "d.dbq.safetensors", model_name="cifar_resnet20")
    key = "conv_s.weight_quant.alpha"
    assert key in read(path)[1]
    bad = resign(path, tmp_path / "bad.dbq.safetensors", edit_tensors=lambda t: t[key].zero_())
    with pytest.raises(dbq.ArtifactError, match=key):
        dbq.load_int(bad, model=SignedNet())


def test_search_refuses_binary_models_and_served_weights_keep_outputs(small: tuple[nn.Module, torch.Tensor]) -> None:
    from lightning_dbq.search.pipeline import served_weights
    from lightning_dbq.search.subnet import build_problem

    model, x = small
    with pytest.raises(
        ValueError, match=r"SubNet search supports weight_mode in \['double_round'\] only, got 'binary'"
    ):
        build_problem(model, {}, x)
    with torch.no_grad():
        want = model(x)
        with served_weights(model):
            assert torch.equal(model(x), want)


def test_alrs_groups_of_a_binary_model() -> None:
    from lightning_dbq.training.alrs import param_groups

    model = dbq.prepare(SignedNet(), bits=[1], weight_mode="binary")
    groups = {g["dbq_group"]: g for g in param_groups(model, lr=1e-3)}
    assert set(groups) == {"weights", "latent_weights", "act_scales"}  # alpha is a buffer: no weight-scale group
    assert len(groups["act_scales"]["params"]) == 2
    assert groups["latent_weights"]["lr"] == 1e-2  # the binary mode's floor, above lr


# ------------------------------------------------------------------ ONNX (exact mode)


def test_exact_onnx_export_has_int8_sign_codes(small: tuple[nn.Module, torch.Tensor], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from lightning_dbq.export import export_onnx

    model, x = small
    path = export_onnx(model, 1, tmp_path / "b.onnx", x)
    proto = onnx.load(str(path))
    int8 = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    weights = [a for a in int8 if a.ndim >= 2]
    assert len(weights) == 3 and all(set(np.unique(a).tolist()) == {-1, 1} for a in weights)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = dbq.freeze(model, 1)(x).numpy()
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-4), float(np.abs(got - ref).max())


# ------------------------------------------------------------------ learning


def _separable(seed: int, n: int = 1024) -> tuple[torch.Tensor, ...]:
    """Gaussian 15-d inputs labelled by a signed majority vote of their signs, ``[Σ c_i·sign(x_i) > 0]`` with random
    ``c_i = ±1`` (separable from the binarised inputs), 768 train / 256 held-out samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 15, generator=g)
    c = torch.randint(0, 2, (15,), generator=g).float() * 2 - 1
    y = (x.sign() @ c > 0).long()
    return x[:768], y[:768], x[768:], y[768:]


class MLP(nn.Module):
    """Every layer binary (quantize_first/last): signed inputs into fc1, unsigned into fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(15, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_separable_problem_learns_with_binary_weights_and_acts(seed: int, report) -> None:
    torch.manual_seed(seed)
    x, y, xt, yt = _separable(seed)
    model = dbq.prepare(MLP(), bits=[1], weight_mode="binary", quantize_first=True, quantize_last=True)
    assert len(list(iter_quantizers(model))) == 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(model.train()(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    with torch.no_grad():
        acc = float((model.eval()(xt).argmax(-1) == yt).float().mean())
    report(f"binary w1a1 MLP on a separable 15-d problem, seed {seed}: held-out accuracy {acc:.3f} (chance 0.5)")
    assert acc > 0.9


@pytest.mark.slow
def test_dbq_train_binary_on_digits(tmp_path: Path, report) -> None:
    """``dbq-train quant.bits=[1] quant.prepare.weight_mode=binary`` on the bundled digits, 3 epochs (~70 s).

    Binary latent weights need a larger step than the multi-precision default (Adam 5e-4: the val accuracy is
    still at chance after 3 epochs = 69 steps); with ``optim.lr=1e-2`` the run is far above chance.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from lightning_dbq.cli._conf import config_dir
    from lightning_dbq.cli.train import train

    overrides = ["quant.bits=[1]", "quant.prepare.weight_mode=binary", "trainer.max_epochs=3", "optim.lr=1e-2",
                 "logger=none", "callbacks.progress_bar=null", "test=false"]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir())), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg["hydra"]
    metrics = train(cfg)
    acc = metrics["val/acc_w1a1"]
    report(f"dbq-train binary w1a1 cifar_resnet20 on digits, 3 epochs, lr 1e-2: val accuracy {100 * acc:.2f} % "
           "(chance 10 %)")  # fmt: skip
    assert acc > 0.5
    loaded = dbq.load_int(tmp_path / "model.dbq.safetensors")
    assert dbq.quant.get_spec(loaded).weight_mode == "binary"
