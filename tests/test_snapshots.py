"""Rollback snapshots in real fits: one per optimizer holding exactly its parameters (a GAN's discriminator never
receives the generator's weights), only of a state checked finite (a spike rollback cannot bring back a NaN that
NaNGuard repaired), and a restore into other parameters raises."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradwatch import LossSpikeGuard, NaNGuard
from lightning_gradwatch.guards._snapshot import Rollbacks
from tests.models import IN_FEATURES, Classifier, classification_data, mlp, trainer_kwargs

NAN_BATCH = 7


def twin() -> nn.Sequential:
    """The generator and the discriminator have the same shapes: a mix-up would not fail on its own."""
    return nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, IN_FEATURES))


class GanLike(pl.LightningModule):
    """Manual optimization with two optimizers, the generator's (A) then the discriminator's (B) each batch; the
    discriminator's loss is NaN at batch ``NAN_BATCH``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(1)
        self.gen = twin()
        torch.manual_seed(2)
        self.disc = twin()
        self.after: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.gen_statistics: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        loss_a = self.gen(x).pow(2).mean()
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        loss_b = (self.disc(x) - x).pow(2).mean()
        if batch_idx == NAN_BATCH:
            loss_b = loss_b * math.nan
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()
        self.after[batch_idx] = (_copy(self.gen), _copy(self.disc))
        self.gen_statistics[batch_idx] = [b.detach().clone() for b in self.gen.buffers() if b.is_floating_point()]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.gen.parameters(), lr=1e-2),
            torch.optim.SGD(self.disc.parameters(), lr=1e-2, momentum=0.9),
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(256), batch_size=32)


def _copy(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def all_finite(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())


def test_each_optimizer_rolls_back_to_its_own_snapshot(tmp_path: Path) -> None:
    guard, model = NaNGuard(action="rollback", snapshot_every_n_steps=3), GanLike()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[guard], max_epochs=1, max_steps=-1)).fit(model)
    assert guard.rollbacks == 1 and all_finite(model)
    gen_after, disc_after = model.after[NAN_BATCH]
    # the discriminator went back to one of its own earlier states (its snapshot, taken before a clean update)
    assert any(same(disc_after, model.after[i][1]) for i in range(NAN_BATCH))
    assert not any(same(disc_after, model.after[i][0]) for i in range(NAN_BATCH))  # never the generator's weights
    # the generator's step of that batch stands: its weights and BatchNorm statistics moved on from the batch before
    assert not same(gen_after, model.after[NAN_BATCH - 1][0])
    assert not same(model.gen_statistics[NAN_BATCH], model.gen_statistics[NAN_BATCH - 1])


def test_a_restore_into_other_parameters_raises() -> None:
    a, b = mlp(1), mlp(1)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    rollbacks = Rollbacks(every=1, max_rollbacks=3)
    rollbacks.clean_step(a, list(a.parameters()), opt_a)
    rollbacks.clean_step(b, list(b.parameters()), opt_b)
    snapshot_a = rollbacks.snapshot(opt_a)
    assert snapshot_a is not None and snapshot_a.params == list(a.parameters())
    with pytest.raises(RuntimeError, match="refusing to write one set of weights into another"):
        snapshot_a.restore(b, list(b.parameters()), opt_b)
    with pytest.raises(RuntimeError, match="other parameters"):
        rollbacks.restore(b, list(a.parameters()), opt_b)  # B's snapshot, asked to go into A's parameters


# -- a spike rollback after NaNGuard repaired a NaN ------------------------------------------------------------------
POISON, SPIKE = 41, 51


class WithAuxHead(Classifier):
    """A classifier with an auxiliary head used only in validation (no gradient in training, still optimized): a NaN
    there leaves the loss and the gradients finite, so NaNGuard finds it at its weight check (every 10 steps).
    The head turns NaN after step ``POISON``; the loss spikes at ``SPIKE``."""

    def __init__(self) -> None:
        super().__init__(mlp(2), lr=1e-3, optimizer="adam")
        self.aux = nn.Linear(IN_FEATURES, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss * 50.0 if self.global_step == SPIKE else loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step == POISON + 1:  # after step POISON's update
            with torch.no_grad():
                self.aux.weight[0, 0] = math.nan


def test_a_spike_rollback_never_restores_a_nan_that_nan_guard_repaired(tmp_path: Path) -> None:
    nan_guard = NaNGuard(action="rollback", check_params_every_n_steps=10, snapshot_every_n_steps=10)
    spike_guard = LossSpikeGuard(action="rollback", snapshot_every_n_steps=5, warmup_steps=20)
    model = WithAuxHead()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[nan_guard, spike_guard], max_steps=SPIKE + 4))
    trainer.fit(model)
    assert nan_guard.rollbacks == 1  # the NaN found at the step-49 check and repaired
    assert [s["step"] for s in spike_guard.spikes] == [SPIKE] and "rolled back" in spike_guard.alerts[0].message
    assert all_finite(model)  # the spike's rollback went to a finite snapshot, not the one of steps 42-49


# -- an optimizer that gains parameters mid-run ----------------------------------------------------------------------
class FineTuned(Classifier):
    """The first layer frozen for the first epoch (16 steps), then unfrozen into a new parameter group; the loss is
    NaN at step 18, before the next snapshot is due."""

    def __init__(self) -> None:
        super().__init__(mlp(2), lr=1e-2, optimizer="adam")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == 18 else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class Unfreeze(pl.callbacks.BaseFinetuning):
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=1e-2)


def test_a_snapshot_follows_the_optimizer_when_it_gains_parameters(tmp_path: Path) -> None:
    guard, model = NaNGuard(action="rollback", snapshot_every_n_steps=10), FineTuned()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Unfreeze(), guard], max_steps=26))
    trainer.fit(model)  # the snapshot taken before the unfreezing no longer fits: a new one is taken at once
    assert trainer.global_step == 26 and guard.rollbacks == 1 and all_finite(model)
    snapshot = guard._rollbacks.snapshot(trainer.optimizers[0])
    assert snapshot is not None and snapshot.params[0] is model.net[0].weight
