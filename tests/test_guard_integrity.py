"""NaNGuard never calls a poisoned state good: halt checkpoints, snapshots and rollbacks hold finite tensors only.

Each fault is injected into a real fit on CPU: a NaN batch poisoning BatchNorm's running statistics, a NaN written
into a weight, a buffer or an Adam moment, and a NaN in a parameter that never reaches the loss.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_gradwatch import GradWatch, NaNGuard
from tests.models import trainer_kwargs
from tests.test_nan_guard import Poisoned, batchnorm_mlp, finite, finite_buffers


class Inject(Callback):
    """Write NaN at the start of step ``step`` into what ``where(trainer, module)`` returns."""

    def __init__(self, step: int, where: Any) -> None:
        self.step, self.where = step, where

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                self.where(trainer, pl_module).view(-1)[0] = float("nan")


class WithUnused(Poisoned):
    """A classifier with a Linear that never reaches the loss."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.unused = torch.nn.Linear(4, 4)


def tensors_of(checkpoint: Path) -> list[torch.Tensor]:
    """Every floating-point tensor of a checkpoint: weights, buffers and optimizer state."""
    state = torch.load(checkpoint, weights_only=False)
    found = list(state["state_dict"].values())
    for opt in state["optimizer_states"]:
        found += [v for s in opt["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [t for t in found if t.is_floating_point()]


def fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Callback], **kw: Any) -> pl.Trainer:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts")
    kwargs = trainer_kwargs(tmp_path, callbacks=[*callbacks, checkpoints], enable_checkpointing=True, **kw)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model)
    return trainer


def test_halt_checkpoint_after_a_nan_batch_through_batchnorm_is_finite_and_resumable(tmp_path: Path) -> None:
    watch = GradWatch()
    fit(tmp_path, Poisoned(nan_steps=(10,), net=batchnorm_mlp()), [watch], max_steps=30)
    guard = watch.gradwatch_callbacks[0]
    assert isinstance(guard, NaNGuard) and guard.halt_checkpoint is not None
    assert all(torch.isfinite(t).all() for t in tensors_of(Path(guard.halt_checkpoint)))
    # resumed as the log advises, the run recovers: finite weights, statistics and evaluation loss
    model = Poisoned(net=batchnorm_mlp())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "resumed", max_steps=20, limit_val_batches=2))
    trainer.fit(model, ckpt_path=guard.halt_checkpoint)
    assert finite(model) and finite_buffers(model)
    assert torch.isfinite(torch.tensor(trainer.validate(model, verbose=False)[0]["val_loss"]))


def test_halt_with_a_nan_weight_saves_nothing_called_good(tmp_path: Path, gradwatch_log: Any) -> None:
    guard = NaNGuard()
    weight = Inject(8, lambda trainer, module: module.net[0].weight)
    trainer = fit(tmp_path, Poisoned(), [weight, guard], max_steps=30)
    [alert] = guard.alerts
    assert alert.step == 8 and alert.name == "net.0" and "the weights of 1 parameter(s) (net.0.weight)" in alert.message
    assert trainer.global_step == 9 and guard.halt_step == 8
    assert guard.halt_checkpoint is None and not list((tmp_path / "ckpts").glob("gradwatch-halt*"))
    assert (
        "No checkpoint was saved: the weights, buffers or optimizer state are already non-finite" in gradwatch_log.text
    )


def test_nan_weight_under_skip_halts_at_once_and_names_the_weight(tmp_path: Path) -> None:
    guard = NaNGuard(action="skip")
    weight = Inject(8, lambda trainer, module: module.net[2].weight)
    trainer = fit(tmp_path, Poisoned(), [weight, guard], max_steps=100)
    [alert] = guard.alerts
    assert alert.step == 8 and alert.name == "net.2" and "(the source" in alert.message
    assert trainer.global_step == 9 and guard.fault_steps == 1  # not ~90 dropped updates


def test_rollback_refuses_a_poisoned_snapshot_and_reports_at_once(tmp_path: Path) -> None:
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=5, check_params_every_n_steps=None)
    unused = Inject(6, lambda trainer, module: module.unused.weight)
    model = WithUnused()
    trainer = fit(tmp_path, model, [unused, guard], max_steps=20)
    [alert] = guard.alerts
    # the snapshot due at step 10 is checked: the NaN is found there, the snapshot of step 5 restored
    assert alert.step == 10 and alert.name == "unused" and "rolled back" in alert.message
    assert guard.rollbacks == 1 and trainer.global_step == 20 and finite(model)


@pytest.mark.parametrize("action", ["halt", "skip", "rollback"])
def test_a_non_finite_buffer_is_named_at_once_and_repaired_from_the_last_clean_step(
    tmp_path: Path, action: str
) -> None:
    guard = NaNGuard(action=action, snapshot_every_n_steps=2)  # type: ignore[arg-type]
    buffer = Inject(7, lambda trainer, module: module.net[1].running_mean)  # between steps: no forward pass did it
    model = Poisoned(net=batchnorm_mlp())
    trainer = fit(tmp_path, model, [buffer, guard], max_steps=20)
    [alert] = guard.alerts
    assert alert.step == 7 and alert.name == "net.1" and "net.1.running_mean" in alert.message
    assert finite_buffers(model)  # the copy kept after step 6's clean check, or the snapshot, repaired it
    if action == "halt":
        assert trainer.global_step == 8 and guard.halt_checkpoint is not None
        assert all(torch.isfinite(t).all() for t in tensors_of(Path(guard.halt_checkpoint)))
    else:
        assert trainer.global_step == 20


@pytest.mark.parametrize("action", ["halt", "skip", "rollback"])
def test_a_nan_adam_moment_is_caught_and_never_saved_or_restored(tmp_path: Path, action: str) -> None:
    guard = NaNGuard(action=action, snapshot_every_n_steps=4)  # type: ignore[arg-type]
    moment = Inject(9, lambda trainer, module: trainer.optimizers[0].state[module.net[0].weight]["exp_avg"])
    model = Poisoned(optimizer="adam", lr=1e-3)
    trainer = fit(tmp_path, model, [moment, guard], max_steps=20)
    alert = guard.alerts[0]
    assert "net.0.weight (exp_avg)" in alert.message and alert.step == 10
    state = trainer.optimizers[0].state
    if action == "rollback":  # the snapshot of step 8 was checked finite, moments included
        assert trainer.global_step == 20 and finite(model)
        assert all(torch.isfinite(t).all() for s in state.values() for t in s.values())
    else:
        assert trainer.global_step == 11 and guard.halt_checkpoint is None


def test_an_inf_loss_halts_with_a_finite_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lightning_gradwatch")
    guard = NaNGuard()
    fit(tmp_path, Poisoned(loss_factor=float("inf"), factor_from=5, net=batchnorm_mlp()), [guard], max_steps=20)
    assert guard.halt_step == 5 and guard.halt_checkpoint is not None
    assert all(torch.isfinite(t).all() for t in tensors_of(Path(guard.halt_checkpoint)))
    assert "NaNGuard stopped training at step 5" in caplog.text


class Gan(pl.LightningModule):
    """A GAN's two updates per batch: the generator's loss goes through the discriminator, so a NaN in a
    discriminator weight first shows in the generator's (optimizer 0's) step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.gen = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        self.disc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0][:, :8]
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        fake = self.gen(torch.randn_like(real))
        opt_g.zero_grad()
        self.manual_backward(-self.disc(fake).mean())
        opt_g.step()
        opt_d.zero_grad()
        self.manual_backward(self.disc(fake.detach()).mean() - self.disc(real).mean())
        opt_d.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.gen.parameters(), lr=1e-3), torch.optim.Adam(self.disc.parameters(), lr=1e-3)]

    def train_dataloader(self) -> Any:
        from tests.models import classification_data

        return torch.utils.data.DataLoader(classification_data(320), batch_size=32)


def test_rollback_repairs_a_weight_of_the_other_optimizer_that_poisons_this_ones_step(tmp_path: Path) -> None:
    """Optimizer 0's step finds the NaN in a weight only optimizer 1 holds: both are rolled back, training goes on
    (it used to halt, as for a weight no optimizer holds)."""
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=2)
    poison = Inject(10, lambda trainer, module: module.disc[0].weight)  # global_step counts both optimizers' steps
    model = Gan()
    trainer = fit(tmp_path, model, [poison, guard], max_epochs=2, max_steps=-1)
    assert guard.halt_step is None and guard.rollbacks == 1 and trainer.global_step == 40
    assert "so were those of optimizer 1" in guard.alerts[0].message
    assert all(torch.isfinite(t).all() for t in [*model.parameters()])
    for optimizer in trainer.optimizers:
        assert all(torch.isfinite(v).all() for s in optimizer.state.values() for v in s.values())


def test_a_nan_moment_in_a_resumed_checkpoint_halts_before_any_update_lands(tmp_path: Path) -> None:
    """The optimizer state is checked at a fit's first step: a NaN Adam moment saved in a checkpoint is named
    before the update that would write it into the weights (it used to land, and halt a step later)."""
    first = fit(tmp_path, Poisoned(optimizer="adam", lr=1e-3), [], max_steps=6)
    path = tmp_path / "poisoned.ckpt"
    first.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    moments = state["optimizer_states"][0]["state"][0]
    moments["exp_avg"].view(-1)[0] = float("nan")
    torch.save(state, path)
    guard = NaNGuard()  # check_params_every_n_steps=100: not due at step 6
    model = Poisoned(optimizer="adam", lr=1e-3)
    kwargs = trainer_kwargs(tmp_path / "resumed", callbacks=[guard], max_steps=12)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model, ckpt_path=str(path))
    assert guard.halt_step == 6 and trainer.global_step == 7  # the step is counted, its update dropped
    assert "(exp_avg)" in guard.alerts[0].message
    assert finite(model)  # the update was dropped: the NaN moment never reached a weight
