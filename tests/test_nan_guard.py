"""NaNGuard in real Trainer fits on CPU: halt, skip, rollback; fp16 GradScaler; 2-process DDP; resume."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradwatch import GradientNormLogger, NaNGuard
from tests import tensorboard_events as tb
from tests.distributed import run_ddp_script
from tests.models import Classifier, mlp, trainer_kwargs


class Poisoned(Classifier):
    """A classifier whose batches at ``nan_steps`` are NaN (or whose loss is multiplied by ``loss_factor``)."""

    def __init__(
        self,
        nan_steps: tuple[int, ...] = (),
        loss_factor: float = 1.0,
        factor_from: int = 0,
        net: torch.nn.Module | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(net if net is not None else mlp(2), **kw)
        self.nan_steps = set(nan_steps)
        self.loss_factor = loss_factor
        self.factor_from = factor_from

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step in self.nan_steps:
            x = x * float("nan")
        loss = F.cross_entropy(self(x), y)
        return loss * self.loss_factor if self.global_step >= self.factor_from else loss


class WithScheduler(Poisoned):
    """Adam with a step-wise exponential LR decay (a chainable scheduler: it multiplies the current LR)."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def batchnorm_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


class Snapshots(Callback):
    """Weights, buffers and optimizer state at the start of every step."""

    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.buffers: dict[int, list[torch.Tensor]] = {}
        self.optimizer: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]
        self.buffers[trainer.global_step] = [b.detach().clone() for b in pl_module.buffers()]
        self.optimizer[trainer.global_step] = copy.deepcopy(trainer.optimizers[0].state_dict())


def fit(tmp_path: Any, model: pl.LightningModule, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model)
    return trainer


def finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def finite_buffers(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(b).all() for b in module.buffers() if b.is_floating_point())


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_halt_drops_the_update_stops_cleanly_and_saves_the_last_good_state(
    tmp_path: Any, precision: str, gradwatch_log: Any
) -> None:
    guard, snaps = NaNGuard(), Snapshots()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=False)
    model = Poisoned(nan_steps=(10,))
    trainer = fit(
        tmp_path, model, [guard, snaps, checkpoints], max_steps=30, precision=precision, enable_checkpointing=True
    )
    assert trainer.global_step == 11 and trainer.should_stop  # stopped right after the faulty step
    assert finite(model)
    assert same([p.detach() for p in model.parameters()], snaps.weights[10])  # the NaN update never landed
    [alert] = guard.alerts
    assert alert.kind == "non_finite" and alert.step == 10 and alert.name == "loss"
    assert "the loss" in alert.message and "first offending layer 'net.0'" in alert.message
    assert guard.halt_checkpoint is not None
    saved = torch.load(guard.halt_checkpoint, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert torch.equal(saved["net.0.weight"], model.net[0].weight.detach())
    assert f"ckpt_path='{guard.halt_checkpoint}'" in gradwatch_log.text


def test_skip_drops_each_faulty_update_and_alerts_once_per_episode(tmp_path: Any) -> None:
    guard, snaps = NaNGuard(action="skip", log_every_n_steps=1), Snapshots()
    model = Poisoned(nan_steps=(5, 6, 12))
    trainer = fit(tmp_path, model, [guard, snaps], max_steps=20)
    assert trainer.global_step == 20 and finite(model)
    assert same(snaps.weights[5], snaps.weights[7])  # steps 5 and 6 changed nothing
    assert not same(snaps.weights[7], snaps.weights[8])
    assert [a.step for a in guard.alerts] == [5, 12]  # 5-6 is one episode
    assert guard.fault_steps == 3
    faults = dict(tb.scalars(tmp_path / "tb" / "version_0")["gradwatch/guard/faults"])
    assert faults[4] == 0 and faults[19] == 3


def test_non_finite_gradient_names_the_first_offending_layer(tmp_path: Any) -> None:
    def poison(module: Classifier, step: int) -> None:
        if step == 3:
            module.net[2].weight.grad[0, 0] = math.inf

    guard = NaNGuard(action="skip")
    fit(tmp_path, Classifier(mlp(2), hook=poison), [guard], max_steps=6)
    [alert] = guard.alerts
    assert alert.name == "net.2" and alert.value == 1
    assert "gradients of 1 parameter(s) (net.2.weight)" in alert.message and "the loss" not in alert.message


def test_huge_but_finite_gradients_are_not_a_fault(tmp_path: Any) -> None:
    # 1e20 overflows the 2-norm screen (its square is beyond float32): the exact check must clear it
    def huge(module: Classifier, step: int) -> None:
        if step == 3:
            module.net[2].weight.grad[0, 0] = 1e20

    guard, snaps = NaNGuard(action="skip"), Snapshots()
    model = Classifier(mlp(2), hook=huge)
    fit(tmp_path, model, [guard, snaps], max_steps=4)
    assert guard.alerts == [] and guard.fault_steps == 0
    assert model.net[2].weight[0, 0].abs() > 1e17  # the (finite) update landed


def test_rollback_restores_weights_and_optimizer_state_bit_for_bit(tmp_path: Any) -> None:
    guard, snaps = NaNGuard(action="rollback", snapshot_every_n_steps=4), Snapshots()
    model = Poisoned(nan_steps=(10,))
    trainer = fit(tmp_path, model, [guard, snaps], max_steps=14)
    assert trainer.global_step == 14 and guard.rollbacks == 1
    # snapshots are taken before the updates of clean steps 0, 4, 8: step 10 goes back to the start of step 8
    assert same(snaps.weights[11], snaps.weights[8])
    restored, expected = snaps.optimizer[11]["state"], snaps.optimizer[8]["state"]
    assert restored.keys() == expected.keys()
    for key in expected:
        assert torch.equal(restored[key]["momentum_buffer"], expected[key]["momentum_buffer"])
    assert "rolled back" in guard.alerts[0].message


def test_rollback_halts_when_faults_repeat(tmp_path: Any) -> None:
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=4, max_rollbacks=2)
    model = Poisoned(nan_steps=(10, 11, 12, 13))
    trainer = fit(tmp_path, model, [guard], max_steps=30)
    assert guard.rollbacks == 2 and trainer.global_step == 13 and finite(model)


def test_rollback_restores_adam_state_and_keeps_the_lr_schedule(tmp_path: Any) -> None:
    guard, snaps = NaNGuard(action="rollback", snapshot_every_n_steps=4), Snapshots()
    model = WithScheduler(nan_steps=(10,), optimizer="adam", lr=0.01)
    trainer = fit(tmp_path, model, [guard, snaps], max_steps=14)
    assert trainer.global_step == 14 and guard.rollbacks == 1
    assert same(snaps.weights[11], snaps.weights[8])
    restored, expected = snaps.optimizer[11]["state"], snaps.optimizer[8]["state"]
    assert restored.keys() == expected.keys()
    for key in expected:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(restored[key][name], expected[key][name])
    # only the state goes back: the scheduler's LR goes on (0.01 * 0.9**11 at the start of step 11, not 0.9**8)
    assert snaps.optimizer[11]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.9**11)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.9**14)


def inf_grad_at_step_3(module: Classifier, step: int) -> None:
    if step == 3:
        module.net[2].weight.grad[0, 0] = math.inf


@pytest.mark.parametrize("fault", ["nan loss and buffers", "inf gradient"])
def test_the_cpu_host_screen_finds_what_the_device_screen_finds(
    tmp_path: Any, decide_on_host: Callable[[bool], None], fault: str
) -> None:
    """On a CPU the loss and gradient flags are read as they are made: the same faults, named alike, at the same
    steps, and the same weights at the end as the device path."""
    seen = {}
    for host in (True, False):
        decide_on_host(host)
        torch.manual_seed(0)
        if fault == "inf gradient":
            model: pl.LightningModule = Classifier(mlp(2), hook=inf_grad_at_step_3)
        else:
            model = Poisoned(nan_steps=(5, 9), net=batchnorm_mlp())
        guard = NaNGuard(action="skip")
        fit(tmp_path / str(host), model, [guard], max_steps=12)
        seen[host] = ([(a.kind, a.name, a.step, a.message) for a in guard.alerts], guard.fault_steps, model)
    assert seen[True][:2] == seen[False][:2] and seen[True][1] > 0
    assert same(list(seen[True][2].parameters()), list(seen[False][2].parameters()))


def test_rollback_restores_buffers_poisoned_by_the_forward_pass(tmp_path: Any) -> None:
    guard, snaps = NaNGuard(action="rollback", snapshot_every_n_steps=4), Snapshots()
    model = Poisoned(nan_steps=(10,), net=batchnorm_mlp())
    trainer = fit(tmp_path, model, [guard, snaps], max_steps=14)
    assert trainer.global_step == 14 and guard.rollbacks == 1
    assert finite(model) and finite_buffers(model)
    # the snapshot of step 8 is taken after its forward pass (which updated the running statistics)
    assert same(snaps.buffers[11], snaps.buffers[9]) and same(snaps.weights[11], snaps.weights[8])
    [alert] = guard.alerts
    assert "buffers 2 buffer(s) (net.1.running_mean, net.1.running_var)" in alert.message
    assert "rolled back" in alert.message and "only action='rollback'" not in alert.message


def test_skip_restores_the_buffers_the_forward_pass_poisoned(tmp_path: Any) -> None:
    guard, snaps = NaNGuard(action="skip"), Snapshots()
    model = Poisoned(nan_steps=(5,), net=batchnorm_mlp())
    fit(tmp_path, model, [guard, snaps], max_steps=8)
    [alert] = guard.alerts
    assert "buffers 2 buffer(s) (net.1.running_mean, net.1.running_var)" in alert.message
    assert "the buffers were restored to their values before this step" in alert.message
    assert finite(model) and finite_buffers(model)
    assert same(snaps.buffers[6], snaps.buffers[5])  # the faulty batch's update of the statistics was undone


def test_halt_holds_when_min_steps_keeps_the_loop_going(tmp_path: Any) -> None:
    guard, snaps = NaNGuard(), Snapshots()
    model = Poisoned(nan_steps=(10,))
    trainer = fit(tmp_path, model, [guard, snaps], max_steps=40, min_steps=20)
    assert trainer.global_step == 20  # Lightning ignores should_stop until min_steps
    assert same([p.detach() for p in model.parameters()], snaps.weights[10])  # no update after the fault
    assert len(guard.alerts) == 1


def test_fp16_fused_optimizer_benign_overflow_and_collapse(tmp_path: Any) -> None:
    # fused Adam unscales inside its own step: the hook sees scaled gradients and no found-inf yet
    guard = NaNGuard(log_every_n_steps=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    model = Poisoned(optimizer="adam_fused", lr=0.01)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = fit(tmp_path / "a", model, [guard], max_steps=30, plugins=[fp16])
    assert trainer.global_step == 30 and guard.alerts == [] and finite(model)
    # no growth within 30 steps: every overflow halved the scale, and each one was counted exactly
    assert guard.overflow_steps >= 3 and 2.0**24 / 2.0**guard.overflow_steps == scaler.get_scale()

    guard = NaNGuard()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = Poisoned(optimizer="adam_fused", lr=0.01, loss_factor=1e30, factor_from=5)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = fit(tmp_path / "b", model, [guard], max_steps=200, plugins=[fp16])
    assert trainer.global_step <= 5 + 17 + 10
    assert [a.kind for a in guard.alerts] == ["loss_scale_collapse"] and finite(model)


def test_rollback_halts_when_faults_keep_coming_back_between_clean_steps(tmp_path: Any) -> None:
    # a fault every other step: each rollback loses the clean step before it, so no progress is ever kept
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=2, max_rollbacks=2)
    model = Poisoned(nan_steps=(10, 12, 14, 16, 18))
    trainer = fit(tmp_path, model, [guard], max_steps=30)
    assert guard.rollbacks == 2 and trainer.global_step == 15 and finite(model)


def test_fp16_benign_overflow_is_counted_not_alerted(tmp_path: Any) -> None:
    guard = NaNGuard(log_every_n_steps=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    model = Poisoned()
    trainer = fit(tmp_path, model, [guard], max_steps=30, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.global_step == 30 and guard.alerts == [] and finite(model)
    assert guard.overflow_steps >= 3 and 2.0**24 / 2.0**guard.overflow_steps == scaler.get_scale()
    events = tb.scalars(tmp_path / "tb" / "version_0")
    assert dict(events["gradwatch/amp/overflow_steps"])[29] == guard.overflow_steps
    assert dict(events["gradwatch/amp/loss_scale"])[29] == scaler.get_scale()


def test_fp16_collapse_halts_within_a_bounded_number_of_steps(tmp_path: Any) -> None:
    guard = NaNGuard()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = Poisoned(loss_factor=1e30, factor_from=5)  # overflows fp16 at any scale from step 5 on
    trainer = fit(tmp_path, model, [guard], max_steps=200, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    # 16 halvings reach the floor of 1.0; the counters are read every 10 steps
    assert trainer.global_step <= 5 + 17 + 10
    assert [a.kind for a in guard.alerts] == ["loss_scale_collapse"]
    assert finite(model)


def test_fp16_non_finite_loss_is_a_fault(tmp_path: Any) -> None:
    guard = NaNGuard(amp_check_every_n_steps=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model = Poisoned(nan_steps=(12,))
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = fit(tmp_path, model, [guard], max_steps=40, plugins=[fp16], log_every_n_steps=50)
    [alert] = guard.alerts
    assert alert.kind == "non_finite" and alert.name == "loss" and alert.step == 14  # read at the next check
    assert trainer.global_step == 15 and finite(model)


def test_state_survives_a_resume(tmp_path: Any) -> None:
    guard = NaNGuard(action="skip")
    trainer = fit(tmp_path, Poisoned(nan_steps=(3,)), [guard], max_steps=6)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = NaNGuard(action="skip")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=10))
    trainer.fit(Poisoned(nan_steps=(8,)), ckpt_path=tmp_path / "a.ckpt")
    assert resumed.fault_steps == 2 and [a.step for a in resumed.alerts] == [3, 8]


def test_resume_from_the_halt_checkpoint(tmp_path: Any) -> None:
    guard = NaNGuard()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts")
    fit(tmp_path, Poisoned(nan_steps=(10,)), [guard, checkpoints], max_steps=30, enable_checkpointing=True)
    # named after the faulty step, as the alert and the log are; it holds the state before that step's update
    assert guard.halt_checkpoint == str(tmp_path / "ckpts" / "gradwatch-halt-step=10.ckpt")
    # the same fault again right after resuming: a new episode, alerted and halted at once
    again = NaNGuard()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[again], max_steps=30))
    trainer.fit(Poisoned(nan_steps=(11,)), ckpt_path=guard.halt_checkpoint)
    assert [a.step for a in again.alerts] == [10, 11] and trainer.global_step == 12
    # the cause fixed: training goes on from the last good state to the end
    fixed = NaNGuard()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "c", callbacks=[fixed], max_steps=30))
    model = Poisoned()
    trainer.fit(model, ckpt_path=guard.halt_checkpoint)
    assert trainer.global_step == 30 and finite(model) and [a.step for a in fixed.alerts] == [10]


def test_guard_acts_before_the_norm_logger(tmp_path: Any) -> None:
    # listed last, the guard still drops the NaN update before the norm logger looks at the gradients
    norms, guard = GradientNormLogger(log_every_n_steps=1), NaNGuard(action="skip")
    fit(tmp_path, Poisoned(nan_steps=(4,)), [norms, guard], max_steps=8)
    logged = dict(tb.scalars(tmp_path / "tb" / "version_0")["gradwatch/global/grad_norm"])
    assert 4 not in logged and all(math.isfinite(v) for v in logged.values())


def test_ddp_nan_on_one_rank_stops_both_at_the_same_step(tmp_path: Any) -> None:
    rank0, rank1 = run_ddp_script("ddp_nan_guard.py", tmp_path, "halt", timeout=120)
    assert rank0["global_step"] == rank1["global_step"] == 6
    assert rank0["seconds"] < 45 and rank1["seconds"] < 45  # nobody waited for the 60 s collective timeout
    assert rank0["finite"] and rank1["finite"] and rank0["weights"] == rank1["weights"]
    assert [a["kind"] for a in rank0["alerts"]] == ["non_finite"] == [a["kind"] for a in rank1["alerts"]]
    # the checkpoint on halt is a collective save: both ranks know it, rank 0 wrote it, with finite weights
    assert (
        rank0["halt_checkpoint"] == rank1["halt_checkpoint"] == str(tmp_path / "ckpts" / "gradwatch-halt-step=5.ckpt")
    )
    assert rank0["saved"] == {"global_step": 6, "finite": True}


def test_ddp_rollback_on_one_rank_keeps_the_ranks_in_step(tmp_path: Any) -> None:
    rank0, rank1 = run_ddp_script("ddp_nan_guard.py", tmp_path, "rollback", timeout=120)
    assert rank0["global_step"] == rank1["global_step"] == 12
    assert rank0["rollbacks"] == rank1["rollbacks"] == 1
    assert rank0["finite"] and rank1["finite"] and rank0["weights"] == rank1["weights"]
    assert rank0["alerts"] == rank1["alerts"] and rank0["alerts"][0]["step"] == 5


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"action": "explode"}, "action"),
        ({"check_params_every_n_steps": 0}, "check_params_every_n_steps"),
        ({"snapshot_every_n_steps": -1}, "snapshot_every_n_steps"),
        ({"max_rollbacks": 0}, "max_rollbacks"),
        ({"min_loss_scale": 0.0}, "min_loss_scale"),
        ({"min_loss_scale": math.inf}, "min_loss_scale"),
        ({"max_consecutive_overflows": 0}, "max_consecutive_overflows"),
        ({"amp_check_every_n_steps": 1.5}, "amp_check_every_n_steps"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        NaNGuard(**kwargs)


def test_a_float16_adam_update_that_divides_by_zero_is_named_with_its_cause(tmp_path: Any) -> None:
    """``16-true`` with Adam: its eps (1e-8) is 0 in float16, so the first update writes Inf/NaN into the weights.
    The alert says so and points to 16-mixed, not to the learning rate."""
    guard = NaNGuard()
    model = Poisoned(optimizer="adam", lr=1e-3)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[guard], precision="16-true", max_steps=5)).fit(model)
    [alert] = guard.alerts
    assert alert.cause == "half_precision_update" and guard.halt_step is not None
    assert "eps=1e-08 is 0 in float16" in alert.message and "16-mixed" in alert.message
    assert "lower the learning rate" not in alert.message
