"""Nothing found is lost, nothing is misreported: an explosion just before a checkpoint or after the last logging
step, a NaN in a weight no optimizer holds, a run resumed from a halt and stopped by something else, a layer name
holding ``|``. Real fits on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_gradwatch import GradientNormLogger, GradWatch, HealthReport, NaNGuard
from lightning_gradwatch.alerts import Alert
from lightning_gradwatch.diagnosis.health_report import render_markdown, summarize
from tests import failure_models as fm
from tests.models import Classifier, mlp, trainer_kwargs
from tests.test_preset import NaNAt


def spike_at(step: int) -> Any:
    def spike(module: Classifier, now: int) -> None:
        if now == step:
            for p in module.parameters():
                p.grad.mul_(1e4)

    return spike


class SaveThenDie(Callback):
    """Save a checkpoint at the end of step ``step``, then kill the run (a preempted job)."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("preempted")


def test_an_explosion_just_before_a_checkpoint_is_reported_after_resuming(tmp_path: Path) -> None:
    logger = GradientNormLogger(log_every_n_steps=10)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[logger, SaveThenDie(tmp_path / "mid.ckpt", 15)]))
    with pytest.raises(RuntimeError, match="preempted"):
        trainer.fit(Classifier(mlp(2), lr=1e-3, hook=spike_at(12)))
    assert not [a for a in logger.alerts if a.kind == "exploding_gradient"]  # no logging step since step 12
    resumed = GradientNormLogger(log_every_n_steps=10)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=25))
    trainer.fit(Classifier(mlp(2), lr=1e-3), ckpt_path=tmp_path / "mid.ckpt")
    [alert] = [a for a in resumed.alerts if a.kind == "exploding_gradient"]
    assert alert.onset == 12 and alert.step == 19


def test_an_explosion_after_the_last_logging_step_is_reported_when_training_ends(tmp_path: Path) -> None:
    logger = GradientNormLogger(log_every_n_steps=10)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[logger], max_steps=18))
    trainer.fit(Classifier(mlp(2), lr=1e-3, hook=spike_at(15)))
    [alert] = [a for a in logger.alerts if a.kind == "exploding_gradient"]
    assert alert.onset == 15 and alert.step == 18


class FrozenNaN(Classifier):
    """A frozen weight (no optimizer holds it) used in forward, poisoned at step 6."""

    def __init__(self) -> None:
        super().__init__(mlp(2))
        self.scale = torch.nn.Linear(4, 4)
        self.scale.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.net(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 6:
            with torch.no_grad():
                self.scale.weight[0, 0] = float("nan")
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


def test_a_nan_in_a_frozen_weight_halts_at_once_naming_it_and_no_checkpoint_calls_it_good(tmp_path: Path) -> None:
    for action in ("skip", "halt", "rollback"):  # no snapshot holds a frozen weight: rollback cannot repair it
        guard = NaNGuard(action=action)  # type: ignore[arg-type]
        checkpoints = ModelCheckpoint(dirpath=tmp_path / action)
        kwargs = trainer_kwargs(tmp_path / action, callbacks=[guard, checkpoints], enable_checkpointing=True)
        trainer = pl.Trainer(**{**kwargs, "max_steps": 60})
        trainer.fit(FrozenNaN())
        [alert] = guard.alerts
        assert alert.step == 6 and trainer.global_step == 7, action  # skip cannot repair it: halted at once
        assert "scale.weight" in alert.message and alert.cause == "poisoned_weights"
        assert guard.halt_checkpoint is None and not list((tmp_path / action).glob("gradwatch-halt*"))


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True  # as EarlyStopping does


def test_a_run_resumed_from_a_halt_and_stopped_by_something_else_is_not_blamed_on_the_guard(tmp_path: Path) -> None:
    guard, checkpoints = NaNGuard(), ModelCheckpoint(dirpath=tmp_path / "ckpts")
    kwargs = trainer_kwargs(tmp_path, callbacks=[guard, checkpoints], enable_checkpointing=True, max_steps=40)
    pl.Trainer(**kwargs).fit(NaNAt(step=5))
    assert guard.halt_checkpoint is not None
    report = HealthReport(dirpath=str(tmp_path / "report"), print_report=False)
    resumed = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[NaNGuard(), report, StopAt(9)], max_steps=40))
    resumed.fit(NaNAt(step=10**6), ckpt_path=guard.halt_checkpoint)
    saved = json.loads((tmp_path / "report" / "gradwatch_report.json").read_text())
    assert saved["stopped_early"] is False and saved["stopped_at"] is None
    assert "NaNGuard" not in (tmp_path / "report" / "gradwatch_report.md").read_text().splitlines()[0]


def test_a_layer_name_with_a_bar_keeps_the_report_table_whole() -> None:
    alert = Alert(3, "dead_neurons", "blocks.a|b", 0.9, 0.3, "Dead units.")
    table = [line for line in render_markdown(summarize([alert]), 10).splitlines() if line.startswith("| ")]
    header, row = table[0], table[-1]
    assert row.replace("\\|", "").count("|") == header.count("|")


class NaNGradientAt(Callback):
    """A NaN in one gradient at ``step`` (the forward pass, and so the activations, stay finite)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            pl_module.net.fc1.weight.grad[0, 0] = float("nan")


def test_no_finding_is_dated_after_the_halt(tmp_path: Path) -> None:
    # a layer dead from the start, judged at the end of step 25 (dated 26): the step the guard halts on
    watch = GradWatch()
    fm.fit(fm.dead_layer_mlp(), 60, [watch, NaNGradientAt(25)], tmp_path)
    guard = watch.gradwatch_callbacks[0]
    assert guard.halt_step == 25 and max(a.step for a in watch.alerts) <= 25
    report = json.loads(next(tmp_path.rglob("gradwatch_report.json")).read_text())
    assert report["stopped_at"] == 25 and all(f["last_step"] <= 25 for f in report["findings"])
