"""HealthReport: the end-of-run diagnosis, printed once and saved as Markdown and JSON."""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import pytest
from torch import nn

from lightning_gradwatch import Alert, GradientNormLogger, HealthReport
from lightning_gradwatch.diagnosis.health_report import render_markdown, summarize
from tests.models import Classifier, mlp, trainer_kwargs


def test_summarize_folds_alerts_per_kind_and_layer() -> None:
    alerts = [
        Alert(9, "dead_neurons", "fc1", 0.3, 0.2, "first fc1"),
        Alert(4, "dead_neurons", "fc1", 0.9, 0.2, "earlier fc1"),
        Alert(5, "vanishing_gradient", "fc0", 1e-12, 1e-7, "vanish"),
    ]
    vanishing, dead = sorted(summarize(alerts), key=lambda f: f.kind, reverse=True)
    assert (dead.first_step, dead.last_step, dead.occurrences, dead.worst_value) == (4, 9, 2, 0.9)
    assert dead.message == "earlier fc1" and "LeakyReLU" in dead.remedy
    assert vanishing.worst_value == 1e-12 and "residual" in vanishing.remedy
    text = render_markdown(summarize(alerts), steps=20)
    assert "Dead units" in text and "`fc1`" in text and "| 4 |" in text


def test_healthy_run_says_so_in_one_line(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    report = HealthReport()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradientNormLogger(), report], max_steps=5))
    trainer.fit(Classifier(mlp(2)))
    out = capsys.readouterr().out
    assert out.count("gradwatch: healthy run") == 1
    md, js = report.report_paths
    assert md.startswith(str(tmp_path / "tb" / "version_0"))
    assert open(md).read().startswith("gradwatch: healthy run") and out.count("\n") == 1
    assert "![Gradient flow across depth](gradient_flow.png)" in open(md).read()  # the picture, beside the file
    assert (tmp_path / "tb" / "version_0" / "gradient_flow.png").stat().st_size > 1000
    assert json.load(open(js)) == {
        "healthy": True, "steps": 5, "stopped_early": False, "stopped_at": None, "findings": [],
        "pictures": ["gradient_flow.png"],
    }  # fmt: skip


def test_sick_run_lists_the_problem_with_layer_step_and_remedy(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    report = HealthReport(dirpath=str(tmp_path / "reports"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[report, GradientNormLogger()], max_steps=5))
    trainer.fit(Classifier(mlp(20, act=nn.Sigmoid)))
    out = capsys.readouterr().out
    assert "Vanishing gradients" in out and "`net.0`" in out and "residual" in out
    data = json.load(open(tmp_path / "reports" / "gradwatch_report.json"))
    assert not data["healthy"]
    [finding] = data["findings"]
    assert finding["kind"] == "vanishing_gradient" and finding["name"] == "net.0" and finding["first_step"] == 0


class Crashes(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_report_is_written_when_the_run_dies(tmp_path: Any) -> None:
    report = HealthReport(print_report=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradientNormLogger(), report], max_steps=10))
    model = Crashes(mlp(20, act=nn.Sigmoid))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model)
    assert json.load(open(report.report_paths[1]))["findings"][0]["kind"] == "vanishing_gradient"


def test_bad_dirpath() -> None:
    with pytest.raises(ValueError, match="`dirpath`"):
        HealthReport(dirpath=3)  # type: ignore[arg-type]
