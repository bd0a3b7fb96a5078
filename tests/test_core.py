"""The shared glue: callback ordering, merged TensorBoard layout, alert dedup and its state."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_gradwatch import Alert, GradientNormLogger
from lightning_gradwatch._core import GradwatchCallback, merge_layouts
from tests import tensorboard_events as tb
from tests.models import Classifier, mlp, trainer_kwargs

calls: list[str] = []


class Recorder(GradwatchCallback):
    def __init__(self, label: str, order: int, chart: str) -> None:
        super().__init__()
        self.label, self.hook_order, self.chart = label, order, chart  # type: ignore[misc]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(label=self.label)

    def _before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        calls.append(self.label)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        calls.append(f"setup {self.label}")

    def _tensorboard_layout(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {"gradwatch: gradients": {self.chart: ["Multiline", [f"^gradwatch/{self.label}"]]}}


class Plain(Callback):
    def on_before_optimizer_step(self, *args: Any) -> None:
        calls.append("plain")


def test_gradwatch_callbacks_run_in_hook_order_whatever_the_user_order(tmp_path: Any) -> None:
    calls.clear()
    callbacks = [Recorder("clip", 30, "c"), Plain(), Recorder("guard", 0, "g"), Recorder("norms", 10, "n")]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_steps=1))
    trainer.fit(Classifier(mlp(1)))
    # every callback set up exactly once; on the optimizer step the gradwatch callbacks run in hook_order
    assert calls[:3] == ["setup clip", "setup guard", "setup norms"]
    assert calls[3:] == ["guard", "norms", "clip", "plain"]
    [layout] = tb.layouts(tmp_path / "tb" / "version_0")  # one merged layout, written once
    assert set(layout["gradwatch: gradients"]) == {"g", "n", "c"}


def test_merge_layouts_combines_same_charts() -> None:
    merged = merge_layouts(
        [{"a": {"x": ["Multiline", ["^1"]]}}, {"a": {"x": ["Multiline", ["^2", "^1"]], "y": ["Multiline", ["^3"]]}}]
    )
    assert merged == {"a": {"x": ["Multiline", ["^1", "^2"]], "y": ["Multiline", ["^3"]]}}


def test_condition_alerts_once_per_onset_and_state_round_trips(tmp_path: Any, gradwatch_log: Any) -> None:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    cb = GradientNormLogger()

    def make(step: int) -> Any:
        return lambda: Alert(step, "saturation", "layer", 0.9, 0.5, f"saturated at {step}")

    for step, firing in [(0, True), (1, True), (2, False), (3, True), (4, True)]:
        cb._set_condition(trainer, "saturation", "layer", firing, make(step))
    assert [a.step for a in cb.alerts] == [0, 3]
    assert len(gradwatch_log.records) == 2

    restored = GradientNormLogger()
    restored.load_state_dict(cb.state_dict())
    assert restored.alerts == cb.alerts
    restored._set_condition(trainer, "saturation", "layer", True, make(5))  # still active: no repeat
    assert len(restored.alerts) == 2


def test_alert_is_frozen_and_round_trips() -> None:
    alert = Alert(3, "dead_neurons", "fc1", 0.4, 0.2, "msg")
    assert Alert.from_dict(alert.to_dict()) == alert
    with pytest.raises(AttributeError):
        alert.step = 4  # type: ignore[misc]
