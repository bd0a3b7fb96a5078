"""Growth that hurts nothing is worth knowing, not a warning: a gradient norm past its limit, or clipped spikes,
while the training loss keeps improving (a fine-tune's norm rises as its loss falls; a GRU leaving its plateau
jumps). The same growth with a flat loss stays a warning. Real fits; the loss history they judge by is the Trainer's
loss trace (lightning_gradwatch/_loss_trace.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_gradwatch import AdaptiveClipping, GradientNormLogger
from lightning_gradwatch._loss_trace import LossHistory
from tests.models import Classifier, classification_data, mlp, trainer_kwargs


def fit(tmp_path: Path, lr: float, callback: Any, steps: int = 100) -> None:
    model = Classifier(mlp(3, width=32), data=classification_data(4096), lr=lr, optimizer="adam")
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_steps=steps, log_every_n_steps=25)).fit(model)


@pytest.mark.parametrize(("lr", "severity"), [(3e-3, "info"), (0.0, "warning")])
def test_a_norm_past_its_limit_is_info_while_the_loss_improves_and_a_warning_when_it_does_not(
    tmp_path: Path, lr: float, severity: str
) -> None:
    logger = GradientNormLogger(exploding_threshold=1e-3)  # every step is past it: what matters is the loss
    fit(tmp_path, lr, logger)
    exploding = [a for a in logger.alerts if a.kind == "exploding_gradient"]
    assert exploding and {a.severity for a in exploding} == {severity}
    if severity == "info":
        assert "keeps improving" in exploding[0].message


@pytest.mark.parametrize(("lr", "severity"), [(3e-3, "info"), (0.0, "warning")])
def test_clipped_spikes_are_info_while_the_loss_improves(tmp_path: Path, lr: float, severity: str) -> None:
    clipping = AdaptiveClipping(z_threshold=0.1, alert_ratio=1.0, warmup_steps=5)  # most steps count as spikes
    fit(tmp_path, lr, clipping)
    spikes = [a for a in clipping.alerts if a.kind == "gradient_spike"]
    assert spikes and spikes[-1].severity == severity and spikes[-1].count > 1


def test_loss_history_improving_and_divergence() -> None:
    falling = LossHistory([2.0, 1.9, 1.8], [2.0 - 0.01 * i for i in range(60)], 59)
    flat = LossHistory([1.0, 1.0, 1.0], [1.0 + 0.001 * (-1) ** i for i in range(60)], 59)
    assert falling.improving() is True and flat.improving() is False
    assert LossHistory([1.0], [1.0] * 3, 2).improving() is None  # too few to say
    grown = LossHistory([1.0, 1.0, 1.0], [1.0, 5.0, 50.0, math.nan], 3).divergence()
    assert grown is not None and grown.factor == 50.0 and grown.end_step == 2
    assert LossHistory([1.0, 1.0, 1.0], [1.0, 2.0, 5.0], 2).divergence() is None
