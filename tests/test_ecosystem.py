"""Fit with the ecosystem: the pytorch_lightning namespace, one metrics row per step, alerts off the progress bar's
line, a TensorBoard layout in a useful order with no chart that can never hold data."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_gradwatch import GradWatch
from tests import tensorboard_events as tb
from tests.models import Classifier, mlp, trainer_kwargs
from tests.test_nan_guard import Poisoned

ROOT = Path(__file__).parent.parent


def test_the_pytorch_lightning_namespace_gets_every_feature(tmp_path: Path) -> None:
    pytorch_lightning = pytest.importorskip("pytorch_lightning")
    watch = GradWatch(nan_action="skip")
    trainer = pytorch_lightning.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=12,
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=pytorch_lightning.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0),
        callbacks=[watch],
    )
    model = Poisoned(nan_steps=(5,))
    # a LightningModule of the other namespace trains as well: the callbacks only need the Trainer's duck type
    trainer.fit(_as_pytorch_lightning(model, pytorch_lightning))
    run = tmp_path / "tb" / "version_0"
    assert tb.layouts(run) and "gradwatch/alerts/non_finite" in tb.texts(run)  # layout and alert text written
    assert (run / "gradwatch_report.md").exists()  # in the version folder, not the logger's root
    assert [a.kind for a in watch.alerts] == ["non_finite"]


def _as_pytorch_lightning(model: Classifier, namespace: Any) -> Any:
    """The same classifier as a ``pytorch_lightning.LightningModule``."""

    class Module(namespace.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.inner.trainer = self.trainer  # type: ignore[misc]
            return self.inner.training_step(batch, batch_idx)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self) -> Any:
            return model.train_dataloader()

    return Module()


def test_one_metrics_row_per_logging_step(tmp_path: Path) -> None:
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradWatch()], max_steps=40, logger=logger))
    trainer.fit(Classifier(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))))
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if any(v for k, v in r.items() if k.startswith("gradwatch/"))]
    per_step = Counter(r["step"] for r in rows)
    assert per_step and set(per_step.values()) == {1}  # guard, norms, clipping, activations: one row
    last = rows[-1]
    assert last["gradwatch/global/grad_norm"] and last["gradwatch/clip/pre_clip_norm"]
    assert last["gradwatch/dead_fraction/net.0"] and last["gradwatch/guard/faults"]


def test_layout_puts_gradients_first_and_leaves_out_charts_that_cannot_hold_data(tmp_path: Path) -> None:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradWatch()], max_steps=12))
    trainer.fit(Classifier(mlp(3)))  # ReLU only: no sigmoid or tanh to saturate
    [layout] = tb.layouts(tmp_path / "tb" / "version_0")
    categories = list(layout)
    assert categories[0] == "gradwatch: gradients" and categories[-1] == "gradwatch: guard"
    assert "saturated outputs (fraction per layer)" not in layout.get("gradwatch: activations", {})
    assert "dead units (fraction per layer)" in layout["gradwatch: activations"]


SCRIPT = """
import sys, torch, lightning.pytorch as pl
sys.path.insert(0, {root!r})
from lightning_gradwatch import GradWatch
from tests.test_nan_guard import Poisoned
pl.Trainer(max_steps=12, log_every_n_steps=1, enable_checkpointing=False, logger=False, enable_model_summary=False,
           default_root_dir={tmp!r}, callbacks=[GradWatch(nan_action="skip")]).fit(Poisoned(nan_steps=(4,)))
"""


def test_alerts_print_on_their_own_line_beside_the_progress_bar(tmp_path: Path) -> None:
    # a fresh interpreter: no logging handler configured, as in a user's script
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(root=str(ROOT), tmp=str(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = (done.stdout + done.stderr).replace("\r", "\n")
    lines = [line for line in output.splitlines() if "[gradwatch non_finite]" in line]
    assert len(lines) == 1 and lines[0].startswith("[gradwatch non_finite] step 4:")  # not glued to the bar
