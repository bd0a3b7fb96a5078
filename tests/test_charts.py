"""Bounded, readable charts on deep models: ``layers=`` filters, one series per block, a budget per metric; the
alerts still judge and name the exact layers. Real fits on CPU, the TensorBoard event files read back."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradwatch import GradientNormLogger, GradWatch
from lightning_gradwatch._charts import charted, plan_charts
from tests.models import Classifier, DeepResidualMLP, trainer_kwargs
from tests.tensorboard_events import layouts, scalars


def fit(tmp_path: Path, callbacks: list[Callback], steps: int = 20, **kw: Any) -> Path:
    logger = TensorBoardLogger(str(tmp_path), name="run")
    kwargs = trainer_kwargs(tmp_path, callbacks=callbacks, max_steps=steps, logger=logger, log_every_n_steps=5, **kw)
    pl.Trainer(**kwargs).fit(Classifier(DeepResidualMLP(), lr=0.01))
    return Path(logger.log_dir)


def series(logdir: Path, family: str) -> set[str]:
    return {
        tag.removeprefix(f"gradwatch/{family}/") for tag in scalars(logdir) if tag.startswith(f"gradwatch/{family}/")
    }


def test_the_patterns_and_the_plan_alone() -> None:
    assert charted("blocks.3.fc1", ["blocks.*"]) and not charted("out", ["blocks.*"])
    assert not charted("blocks.3.fc1", ["blocks.*", "!*.fc1"]) and charted("out", ["!*.fc1"])
    layers = ["inp", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "out"]
    plan, note = plan_charts(layers, None, "module", ["blocks.0", "blocks.1"], max_series=4)
    assert plan.names == ["inp", "blocks.0", "blocks.1", "out"] and plan.members[1] == [1, 2] and "max_series=4" in note
    assert plan.norms([1.0, 3.0, 4.0, 0.0, 0.0, 2.0], 2.0) == [1.0, 5.0, 0.0, 2.0]
    assert plan.weighted([0.5, 1.0, 0.0, 0.0, 0.0, 0.0], [1, 1, 3, 1, 1, 1])[1] == pytest.approx(0.25)
    unbounded, none = plan_charts(layers, None, "module", ["blocks.0", "blocks.1"], max_series=None)
    assert unbounded.names == layers and none is None
    with pytest.raises(ValueError, match="`layers`"):
        GradientNormLogger(layers="blocks.*")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_series"):
        GradientNormLogger(max_series=0)


def test_a_deep_model_is_charted_within_the_budget_and_its_block_norms_are_exact(tmp_path: Path) -> None:
    """98 layers under the default budget of 64: one series per block (50), each block's norm the root-sum-of-
    squares of its gradients as read off the parameters at the same step; the layout lists the same series."""

    class Truth(Callback):
        def __init__(self) -> None:
            self.norms: dict[int, dict[str, float]] = {}

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            found: dict[str, float] = {}
            for name, p in pl_module.named_parameters():
                parts = name.split(".")
                key = ".".join(parts[:3]) if parts[1] == "blocks" else parts[0] + "." + parts[1]
                found[key] = found.get(key, 0.0) + float(p.grad.pow(2).sum())
            self.norms[trainer.global_step] = {k: math.sqrt(v) for k, v in found.items()}

    truth = Truth()
    logdir = fit(tmp_path, [GradWatch(clipping=None, activations=False), truth])
    names = series(logdir, "grad_norm")
    assert len(names) == 50 and "net.blocks.17" in names and "net.blocks.17.fc1" not in names
    for family in ("grad_to_weight", "update_to_weight", "zero_fraction"):
        assert 0 < len(series(logdir, family)) <= 64, family
    logged = scalars(logdir)["gradwatch/grad_norm/net.blocks.17"]
    for logger_step, value in logged:
        step = {s: n for s, n in truth.norms.items()}[logger_step]  # one optimizer step per logger step here
        assert value == pytest.approx(step["net.blocks.17"], rel=1e-4)
    charts = [tag for layout in layouts(logdir) for c in layout.values() for tags in c.values() for tag in tags]
    assert any("blocks\\.17" in tag for tag in charts) and not any("blocks\\.17\\.fc1" in tag for tag in charts)


def test_layers_patterns_choose_the_series_and_max_series_none_keeps_every_layer(tmp_path: Path) -> None:
    logdir = fit(tmp_path / "chosen", [GradientNormLogger(layers=["net.blocks.1.*", "net.out"])])
    assert series(logdir, "grad_norm") == {"net.blocks.1.fc1", "net.blocks.1.fc2", "net.out"}
    everything = fit(tmp_path / "all", [GradientNormLogger(max_series=None)], steps=6)
    assert len(series(everything, "grad_norm")) == 98


def test_a_stopped_layer_inside_a_charted_block_is_still_named_exactly(tmp_path: Path) -> None:
    """Charts per block; the alert names ``net.blocks.5.fc1``, whose gradient is exactly zero from step 3 on."""

    class SwitchOff(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                pl_module.net.blocks[5].fc1_on = False

    watch = GradientNormLogger(group_by="block", stop_after_steps=10)
    logdir = fit(tmp_path, [SwitchOff(), watch], steps=30)
    [alert] = [a for a in watch.alerts if a.kind == "stopped_layer"]
    assert alert.name == "net.blocks.5.fc1"
    assert "net.blocks.5" in series(logdir, "grad_norm") and "net.blocks.5.fc1" not in series(logdir, "grad_norm")
