"""The per-bit loop: passes per batch, per-bit parameter isolation, A.1 accumulation, and the guards."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

import lightning_dbq as dbq
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.training import DBQModule, DoubleRoundingQAT
from lightning_dbq.training.alrs import param_groups
from lightning_dbq.training.loop import check_training_setup
from lightning_dbq.training.state import BitLoopState
from tests.helpers.tiny import PlainClassifier, TinyNet


def _trainer(**kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    base.update(kw)
    return pl.Trainer(**base)


def _dm(**kw) -> SyntheticDataModule:
    return SyntheticDataModule(num_samples=96, num_classes=4, image_size=8, batch_size=16, **kw)


def _other_bit_params(model: torch.nn.Module, active: int) -> dict[str, torch.Tensor]:
    """Parameters owned by bits other than ``active`` (activation scales and per-bit norms)."""
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        for marker in ("scales", "norms"):
            if marker in parts and parts[parts.index(marker) + 1] != str(active):
                out[name] = p.detach().clone()
    return out


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_one_bit_step_leaves_other_bits_parameters_unchanged(opt_name: str) -> None:
    torch.manual_seed(0)
    model = dbq.prepare(TinyNet(), bits=[8, 4, 2])
    groups = param_groups(model, lr=0.05)
    opt = torch.optim.SGD(groups, momentum=0.9) if opt_name == "sgd" else torch.optim.Adam(groups)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    for _ in range(2):  # every bit's parameters get optimizer state (momentum / Adam moments)
        for b in (8, 4, 2):
            dbq.set_bits(model, b)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    others = _other_bit_params(model, active=4)
    assert len(others) >= 6
    dbq.set_bits(model, 4)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, before in others.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    moved = model.get_submodule("conv2").act_quant.scales["4"]
    assert moved.grad is not None


class _Recorder(Callback):
    """Instrumented callback: per optimizer step, which bit is active and which per-bit params have grads."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, bool]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        state = pl_module.dbq_state
        others_have_grad = any(
            p.grad is not None
            for n, p in state.model.named_parameters()
            if n in _other_bit_params(state.model, state.active_bits)
        )
        self.steps.append((state.active_bits, others_have_grad))


@pytest.mark.parametrize("strategy", ["dbq", "auto"])
def test_dbqmodule_runs_every_bit_per_batch(strategy: str) -> None:
    module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], lr=5e-3)
    rec = _Recorder()
    trainer = _trainer(strategy=strategy, callbacks=[rec], max_epochs=2)
    trainer.fit(module, _dm())
    batches = 2 * 5  # 72 train samples / 16 -> 5 batches per epoch
    assert module.dbq_state.backward_calls == batches * 3
    assert trainer.global_step == batches  # global_step still counts batches
    assert [b for b, _ in rec.steps] == [8, 4, 2] * batches
    assert not any(flag for _, flag in rec.steps)  # other bits' params never carry gradients into a step


def test_algorithm_a1_accumulates_all_bits_into_one_step() -> None:
    torch.manual_seed(0)
    module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], algorithm="A1", alrs="off", lr=5e-3)
    rec = _Recorder()
    trainer = _trainer(strategy="dbq", callbacks=[rec], limit_train_batches=2)
    # reference: the summed gradient of the three bits on the first batch, from a copy
    dm = _dm()
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    ref = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], algorithm="A1", alrs="off")
    ref.load_state_dict(module.state_dict())
    grads = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for b in (8, 4, 2):
        dbq.set_bits(ref.model, b)
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for n, p in ref.named_parameters():
            if p.grad is not None:
                grads[n] += p.grad

    captured = {}

    class _Grab(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if not captured:
                captured.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    trainer.callbacks.append(_Grab())
    trainer.fit(module, dm)
    assert len(rec.steps) == 2  # one optimizer step per batch
    assert module.dbq_state.backward_calls == 6
    for n, g in captured.items():
        torch.testing.assert_close(g, grads[n], rtol=1e-4, atol=1e-6)


def test_guard_manual_optimization() -> None:
    module = DBQModule(TinyNet(), num_classes=4, bits=[8, 2])
    module.automatic_optimization = False
    module.training_step = types.MethodType(lambda self, b, i: None, module)
    with pytest.raises(RuntimeError, match="needs automatic optimization"):
        _trainer(strategy="dbq").fit(module, _dm())


def test_guard_gradient_accumulation() -> None:
    module = DBQModule(TinyNet(), num_classes=4, bits=[8, 2])
    with pytest.raises(RuntimeError, match=r"accumulate_grad_batches=2\) is not supported"):
        _trainer(strategy="dbq", accumulate_grad_batches=2).fit(module, _dm())


def test_guard_ddp_without_find_unused_parameters(tmp_path) -> None:
    """The guard reads the public ``find_unused_parameters`` of the DDP wrapper the strategy built."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = dbq.prepare(TinyNet(), bits=[8, 2])
    state = BitLoopState(model=model, bits=(8, 2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for flag in (False, True):
            wrapped = DistributedDataParallel(model, find_unused_parameters=flag)
            strategy = types.SimpleNamespace(model=wrapped)
            opts = [torch.optim.SGD(model.parameters(), lr=0.1)]
            trainer = types.SimpleNamespace(accumulate_grad_batches=1, strategy=strategy, optimizers=opts)
            module = types.SimpleNamespace(automatic_optimization=True, trainer=trainer)
            if flag:
                check_training_setup(module, state)
            else:
                with pytest.raises(RuntimeError, match="find_unused_parameters=True"):
                    check_training_setup(module, state)
    finally:
        dist.destroy_process_group()


def test_guard_quantized_parameters_missing_from_optimizer() -> None:
    class Late(PlainClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam([self.net.conv1.weight], lr=1e-3)

    with pytest.raises(RuntimeError, match="not in any optimizer"):
        _trainer(callbacks=[DoubleRoundingQAT(bits=[8, 2], num_classes=4)]).fit(Late(), _dm())


def test_unknown_algorithm_or_alrs_mode() -> None:
    with pytest.raises(ValueError, match=r"algorithm must be one of \('A2', 'A1'\), got 'A3'"):
        DBQModule(TinyNet(), num_classes=4, bits=[8, 2], algorithm="A3")
    with pytest.raises(ValueError, match="alrs must be one of"):
        DBQModule(TinyNet(), num_classes=4, bits=[8, 2], alrs="sometimes")


def test_progressive_kd_uses_the_previous_bits_detached_logits() -> None:
    seen: list[tuple[int, bool]] = []

    class Spy(DBQModule):
        def training_step(self, batch, batch_idx):
            seen.append((self.dbq_state.active_bits, self.dbq_state.teacher_logits is not None))
            return super().training_step(batch, batch_idx)

    module = Spy(TinyNet(), num_classes=4, bits=[8, 4, 2], kd=True)
    _trainer(strategy="dbq", limit_train_batches=2).fit(module, _dm())
    # highest bit has no teacher; every lower bit learns from the bit before it; reset between batches
    assert seen == [(8, False), (4, True), (2, True)] * 2
