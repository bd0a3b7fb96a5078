"""A failed run keeps its evidence: the gradient norms of the steps before a halt reach TensorBoard and the
gradient-flow picture is drawn, even when the run stops before its first logging step; a faulty logging step under
``skip`` still logs what was finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl

from lightning_gradwatch import GradWatch
from tests import tensorboard_events as tb
from tests.models import Classifier, mlp, trainer_kwargs
from tests.test_preset import NaNAt


def test_a_run_halted_before_its_first_logging_step_has_its_norms_and_picture(tmp_path: Path) -> None:
    watch = GradWatch()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_steps=40, log_every_n_steps=50))
    trainer.fit(NaNAt(step=6))
    assert trainer.global_step == 7
    logdir = tmp_path / "tb" / "version_0"
    tags = tb.scalars(logdir)
    # the six clean steps before the halt, each at its own step, finite
    assert [s for s, _ in tags["gradwatch/grad_norm/net.0"]] == [0, 1, 2, 3, 4, 5]
    assert [s for s, _ in tags["gradwatch/global/grad_norm"]] == [0, 1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for _, v in tags["gradwatch/global/grad_norm"])
    assert "gradwatch/gradient_flow" in tb.load(logdir).Tags()["images"]
    report = json.loads((logdir / "gradwatch_report.json").read_text())
    assert report["pictures"] == ["gradient_flow.png"] and (logdir / "gradient_flow.png").exists()


def test_a_healthy_run_writes_no_extra_norms(tmp_path: Path) -> None:
    watch = GradWatch()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_steps=12, log_every_n_steps=5))
    trainer.fit(NaNAt(step=10**6))
    tags = tb.scalars(tmp_path / "tb" / "version_0")
    assert [s for s, _ in tags["gradwatch/grad_norm/net.0"]] == [4, 9]  # the logging steps only


def test_a_faulty_logging_step_under_skip_still_logs_its_finite_norms(tmp_path: Path) -> None:
    def poison(module: Classifier, step: int) -> None:
        if step == 9:  # a logging step: one layer's gradient goes NaN, the others stay finite
            module.net[0].weight.grad[0, 0] = float("nan")

    watch = GradWatch(nan_action="skip")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_steps=12, log_every_n_steps=5))
    trainer.fit(Classifier(mlp(3, width=32), hook=poison))
    tags = tb.scalars(tmp_path / "tb" / "version_0")
    assert trainer.global_step == 12 and watch.gradwatch_callbacks[0].fault_steps == 1
    assert [s for s, _ in tags["gradwatch/grad_norm/net.2"]] == [4, 9]  # finite at the faulty step: logged
    assert [s for s, _ in tags["gradwatch/grad_norm/net.0"]] == [4]  # NaN there: left out
