"""Parameters that join the optimizer mid-run (``BaseFinetuning`` unfreezing a backbone): every callback sees them."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn

from lightning_gradwatch import AdaptiveClipping, GradientNormLogger, NaNGuard
from tests import tensorboard_events as tb
from tests.models import IN_FEATURES, NUM_CLASSES, Classifier, trainer_kwargs

UNFREEZE_EPOCH = 1  # 512 examples in batches of 32: the backbone joins at step 16
UNFREEZE_STEP = 16
BACKBONE = "net.backbone.0"


class Finetuned(Classifier):
    """A backbone and a head; the optimizer holds what requires a gradient when it is made. ``nan_steps`` feed NaN
    batches, ``spike_step`` multiplies every gradient by ``spike``."""

    def __init__(
        self, nan_steps: tuple[int, ...] = (), spike_step: int | None = None, spike: float = 1e4, **kw: Any
    ) -> None:
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Linear(IN_FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        net = nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(32, NUM_CLASSES)))
        super().__init__(net, hook=self._spike, **kw)
        self.nan_steps = set(nan_steps)
        self.spike_step = spike_step
        self.spike = spike

    @staticmethod
    def _spike(module: Classifier, step: int) -> None:
        assert isinstance(module, Finetuned)
        if step == module.spike_step:
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.mul_(module.spike)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step in self.nan_steps:
            x = x * float("nan")
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


class Unfreeze(BaseFinetuning):
    """Freeze the backbone before training; add it to the optimizer (same learning rate) at ``UNFREEZE_EPOCH``."""

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net.backbone)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == UNFREEZE_EPOCH:
            self.unfreeze_and_add_param_group(pl_module.net.backbone, optimizer, initial_denom_lr=1.0)


class Backbone(Callback):
    """The backbone's first layer at the start of every step, and its gradient norm as the optimizer gets it."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.grad_norms: dict[int, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        layer = pl_module.net.backbone[0]
        self.weights[trainer.global_step] = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.net.backbone[0].parameters() if p.grad is not None]
        if grads:
            self.grad_norms[trainer.global_step] = float(
                torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
            )

    def moved(self, step: int) -> float:
        return float((self.weights[step + 1] - self.weights[step]).norm())


def fit(tmp_path: Any, model: pl.LightningModule, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model)
    return trainer


def test_nanguard_skip_keeps_a_nan_batch_out_of_a_backbone_unfrozen_mid_run(tmp_path: Any) -> None:
    watch, guard = Backbone(), NaNGuard(action="skip")
    model = Finetuned(nan_steps=(25,))
    fit(tmp_path, model, [Unfreeze(), guard, watch], max_steps=30)
    assert len(model.trainer.optimizers[0].param_groups) == 2  # the backbone did join
    assert watch.moved(20) > 0  # it trains after the unfreeze...
    assert watch.moved(25) == 0.0  # ...and the NaN batch's update was dropped for it too
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.totals.fault_steps == 1


def test_adaptive_clipping_clips_a_spike_in_a_backbone_unfrozen_mid_run(tmp_path: Any) -> None:
    """At a x1e4 gradient spike the unfrozen backbone moves about as much as it does when it was in the optimizer
    from the start (where it is clipped): the spike is clipped for it too."""
    spike_step = 40
    moved = {}
    for unfreeze in (True, False):
        watch = Backbone()
        callbacks: list[Callback] = [watch, AdaptiveClipping()] + ([Unfreeze()] if unfreeze else [])  # watch: before
        fit(tmp_path / str(unfreeze), Finetuned(spike_step=spike_step), callbacks, max_steps=spike_step + 2)
        assert watch.grad_norms[spike_step] > 1e3  # the spike reached the backbone's gradient (read before clipping)
        moved[unfreeze] = (watch.moved(spike_step), watch.moved(spike_step - 1))
    (spiked, before), (spiked_from_start, _) = moved[True], moved[False]
    assert spiked < 10 * max(spiked_from_start, before), moved


def test_gradient_norm_logger_logs_a_backbone_unfrozen_mid_run(tmp_path: Any) -> None:
    watch = Backbone()
    fit(tmp_path, Finetuned(), [Unfreeze(), GradientNormLogger(), watch], max_steps=24)
    events = tb.scalars(tmp_path / "tb" / "version_0")
    logged = dict(events[f"gradwatch/grad_norm/{BACKBONE}"])
    assert sorted(logged) == list(range(UNFREEZE_STEP, 24))  # from the unfreeze on, every step
    for step, value in logged.items():
        assert value == pytest.approx(watch.grad_norms[step], rel=1e-5)
    assert f"gradwatch/zero_fraction/{BACKBONE}" in events
    ratios = dict(events[f"gradwatch/update_to_weight/{BACKBONE}"])  # the copy is taken on the step before
    assert ratios and min(ratios) > UNFREEZE_STEP and all(v > 0 for v in ratios.values())
    assert len(dict(events["gradwatch/grad_norm/net.head"])) == 24  # the head, logged all along
