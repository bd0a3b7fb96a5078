"""LossSpikeGuard: a training loss far above its recent history is a spike: log it, skip its update, or roll back."""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._distributed import all_reduce_max, distributed
from lightning_gradwatch._precision import force_found_inf, grad_scaler, unscaled_loss
from lightning_gradwatch._reporting import host_values, log_dir
from lightning_gradwatch._step import StepGradients, host_is_free
from lightning_gradwatch._types import AtLeastThreeInt, FinitePositiveFloat, Null, PositiveFloat, PositiveInt
from lightning_gradwatch._validation import check_choice, check_number
from lightning_gradwatch.alerts import Alert, AlertKind, alert_message
from lightning_gradwatch.core.callback import GradwatchCallback, HookOrder
from lightning_gradwatch.core.session import session_of
from lightning_gradwatch.guards._loss_window import (
    V_DROP,
    V_LOSS,
    V_MEDIAN,
    V_PRINT,
    V_SHIFT,
    V_SPIKE,
    V_Z,
    VERDICT_SIZE,
    LossWindow,
)
from lightning_gradwatch.guards._skip_batches import SkipList, first_tensor, write_spikes
from lightning_gradwatch.guards._snapshot import Rollbacks

SpikeAction = Literal["log", "skip", "rollback"]
SPIKE_ACTIONS: tuple[str, ...] = ("log", "skip", "rollback")


class LossSpikeGuard(GradwatchCallback):
    r"""Catch loss spikes: a step whose training loss lies more than ``z_threshold`` robust standard deviations above
    the median of the last ``window`` steps (``1.4826 * MAD``: the spikes themselves do not widen it; OLMo-core uses
    mean + 6 sigma over 128 steps) and more than ``min_delta`` above it, once ``warmup_steps`` losses are known.

    **Actions**: ``"log"`` (alert and record), ``"skip"`` (drop the update exactly: the optimizer does not step, its
    state is untouched), ``"rollback"`` (restore the last snapshot of weights, buffers and optimizer state, taken
    every ``snapshot_every_n_steps`` spike-free steps and only of a state checked finite, with NaNGuard's snapshot
    machinery). Spikes never enter the window. Every spike's step, its batch (index in the epoch) and a fingerprint
    of the batch's content are recorded in ``gradwatch_spikes.json`` next to the logs; pass that file as
    ``skip_batches`` when resuming to drop those batches' updates (the PaLM recipe: rewind before the spike and skip
    the data that caused it). Batches are found by their fingerprint, so a mid-epoch resume that replays the epoch's
    data from its start drops the right ones.

    **A lasting change of level is no spike.** After ``level_shift_after`` spikes in a row the loss has settled at a
    new level (a new data regime, a curriculum stage): the guard takes it as the level (the window is refilled from
    those losses), stops acting, and says so once (``loss_spike``, info, "level shift"): training never freezes.

    **One alert per episode.** Spikes with fewer than ``window`` steps between them are one episode: it is alerted
    once, and its alert's step, count and message follow it (every spike is still in :attr:`spikes` and the file).

    **No host sync of its own where it can be avoided.** The verdict is decided on the device and reduced over
    ranks (every rank decides and records alike, in every mode). Under ``32-true``/``bf16-mixed`` it rides on
    NaNGuard's one read per step when NaNGuard is there (so with both, a step still costs one sync); alone,
    ``"skip"`` and ``"rollback"`` (and ``skip_batches``) read it (one sync per step) and ``"log"`` reads spikes at
    logging steps. Under ``16-mixed`` ``"skip"`` makes the GradScaler skip the step on the device (no sync), and
    ``"rollback"`` acts as ``"skip"``. On a CPU, where a host read costs nothing, a single process keeps the window
    as Python floats and decides every step on the host (the same median, MAD and threshold), so every action,
    ``"log"`` included, sees a spike at its own step.

    Alerts ``loss_spike`` (info for an isolated spike the run recovers from or a level shift; a warning when spikes
    keep coming). Logs ``gradwatch/loss_spike/z`` (the step's z-score) and ``gradwatch/loss_spike/spikes``
    (cumulative). Automatic optimization only (manual optimization mixes several losses): idle with one warning
    otherwise.

    Args:
        action: ``"log"``, ``"skip"`` or ``"rollback"``.
        z_threshold: robust standard deviations above the median that make a spike.
        min_delta: the least a spike exceeds the median by, in the loss's units: a loss near zero (1e-5 to 3e-5)
            is hundreds of robust deviations from its median but no spike. Lower it for losses on a small scale
            (e.g. the MSE of targets of size 0.01); a tiny value judges by the z-score alone.
        window: how many recent losses the median and MAD are taken over.
        warmup_steps: losses gathered before any spike is called (a young run's loss falls fast).
        level_shift_after: this many spikes in a row are a lasting change of level, taken as the new level.
        snapshot_every_n_steps: with ``"rollback"``, the snapshot cadence in spike-free steps.
        max_rollbacks: with ``"rollback"``, skip instead once the same snapshot was restored this often.
        skip_batches: a ``gradwatch_spikes.json`` of an earlier run: drop the updates of the batches it lists.
        log_every_n_steps: log every this many steps; ``None`` follows the Trainer.

    Raises:
        ValueError: an argument outside its range, naming it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import LossSpikeGuard, NaNGuard

        trainer = Trainer(callbacks=[NaNGuard(), LossSpikeGuard(action="skip")])
    """

    hook_order = HookOrder.LOSS_SPIKE_GUARD  # before the norm logger and clipping: a dropped update is never measured
    single_instance = True

    def __init__(
        self,
        action: SpikeAction = "log",
        z_threshold: PositiveFloat = 6.0,
        min_delta: FinitePositiveFloat = 0.1,
        window: AtLeastThreeInt = 128,
        warmup_steps: PositiveInt = 50,
        level_shift_after: AtLeastThreeInt = 10,
        snapshot_every_n_steps: PositiveInt = 50,
        max_rollbacks: PositiveInt = 3,
        skip_batches: str | os.PathLike[str] | None = None,
        log_every_n_steps: PositiveInt | Null = None,
    ) -> None:
        super().__init__()
        self.action: SpikeAction = check_choice("action", action, SPIKE_ACTIONS)
        self.z_threshold = check_number("z_threshold", z_threshold, gt=0)
        self.min_delta = check_number("min_delta", min_delta, gt=0, finite=True)
        self.window = check_number("window", window, ge=3, integer=True)
        self.warmup_steps = check_number("warmup_steps", warmup_steps, ge=1, integer=True)
        self.level_shift_after = check_number("level_shift_after", level_shift_after, ge=3, integer=True)
        self.snapshot_every_n_steps = check_number("snapshot_every_n_steps", snapshot_every_n_steps, ge=1, integer=True)
        self.max_rollbacks = check_number("max_rollbacks", max_rollbacks, ge=1, integer=True)
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, ge=1, integer=True, optional=True)
        self._skip = SkipList(skip_batches)
        # every batch listed, as (epoch, batch_idx) where it was recorded (those with a fingerprint are found by it)
        self.skip_batches = self._skip.listed
        self.spikes: list[dict[str, Any]] = []  # every spike found: step, epoch, batch_idx, loss, median, z, print
        self.skipped_batches = 0
        self._window = LossWindow(
            self.window, self.level_shift_after, self.warmup_steps, self.z_threshold, self.min_delta
        )
        self._loss: Tensor | float | None = None  # this step's loss, summed over its micro-batches
        self._print: Tensor | float | None = None  # the fingerprint of this step's (first) batch, when taken
        self._tensor: Tensor | None = None  # this step's first batch tensor (a reference)
        self._replayed_epoch: int | None = None  # an epoch a mid-epoch resume replays from its start (-1: none)
        self._drop: Tensor | bool = False  # this step's batch is one of skip_batches (found by its fingerprint)
        self._verdict: Tensor | list[float] | None = None  # this step's verdict (V_* above)
        self._pending: list[tuple[int, int, int, Tensor | list[float]]] = []  # (step, epoch, batch_idx, verdict)
        self._done = "logged"  # what this step's action did, for its record
        self._batch: tuple[int, int] = (0, 0)
        self._episode: dict[str, Any] | None = None  # the open spike episode: first/last step, count, alert
        self._shifts: dict[str, Any] | None = None  # the last level shifts, as an episode
        self._active = True
        self._rollbacks = Rollbacks(self.snapshot_every_n_steps, self.max_rollbacks)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._active = pl_module.automatic_optimization
        self._rollbacks = Rollbacks(self.snapshot_every_n_steps, self.max_rollbacks)
        self._episode = self._shifts = self._replayed_epoch = None
        if not self._active:
            rank_zero_warn("LossSpikeGuard is idle: it watches automatic optimization only (one loss per step).")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first = self._loss is None  # the step's first micro-batch
        if first:
            self._batch = (trainer.current_epoch, batch_idx)
            self._print = self._tensor = None
            if self._replayed_epoch is None:
                self._replayed_epoch = self._skip.epoch_replayed_from_start(trainer, batch_idx)
        tensor = first_tensor(batch)
        if tensor is None or not self._active:
            return
        if first:
            self._tensor = tensor  # a reference, no copy: fingerprinted when a spike is recorded at this step
        if not (self._skip.prints or (first and not self._verdict_read_at_step(trainer, tensor.device))):
            return  # the fingerprint is taken only if needed: to match skip_batches, or for a verdict read later
        fingerprint = self._skip.fingerprint(tensor)
        if first:
            self._print = fingerprint
        if self._skip.prints:  # a listed batch anywhere in the step drops its update
            match = self._skip.matches(fingerprint)
            if isinstance(match, Tensor):
                self._drop = match if first or not isinstance(self._drop, Tensor) else self._drop | match
            else:
                self._drop = match or (bool(self._drop) and not first)

    def _verdict_read_at_step(self, trainer: pl.Trainer, device: torch.device) -> bool:
        """Whether this step's verdict reaches the host at the step in one process (decided on the host, riding on
        NaNGuard's per-step read, or read for the action), so that a spike's batch can be fingerprinted then, on the
        slow path; otherwise (a read at the logging step, several ranks whose verdicts are reduced) the fingerprint
        travels in the verdict, taken on the device every step."""
        if distributed():
            return False
        if host_is_free(device):
            return True
        per_step = self.action != "log" or session_of(trainer).reads_every_step(trainer)
        return per_step and grad_scaler(trainer) is None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        if not (self._active and trainer.training):
            return
        device_value = unscaled_loss(trainer, loss)  # the loss is scaled under fp16
        if host_is_free(loss.device) and trainer.world_size == 1:  # a CPU: decide on the host, in microseconds
            value = float(device_value)
            self._loss = value if not isinstance(self._loss, float) else self._loss + value  # micro-batches: loss / A
            self._verdict = self._window.judge_on_host(self._loss, self._print, self._drop)
            return
        self._loss = device_value if not isinstance(self._loss, Tensor) else self._loss + device_value
        self._verdict = self._window.judge(self._loss, self._print, self._drop)
        if grad_scaler(trainer) is not None and trainer.world_size > 1:  # the device-side skip: the same on every rank
            flags = V_DROP + 1
            self._verdict = torch.cat([all_reduce_max(self._verdict[:flags]), self._verdict[flags:]])
        if session_of(trainer).reads_every_step(trainer):
            # ride on NaNGuard's read (max over ranks): this step's verdict and any not read yet
            unread = [v for *_, v in self._pending if isinstance(v, Tensor)] + [self._verdict]
            session_of(trainer).shared_read.post(self, torch.cat(unread), trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:  # spikes after the last read are recorded and reported, once
            self._handle(trainer, self._pending_values())
        super().on_train_end(trainer, pl_module)

    @override
    def _before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
    ) -> None:
        verdict, self._loss, self._verdict, self._drop = self._verdict, None, None, False
        if step.repeat or not step.grads or verdict is None:
            return
        epoch, batch_idx = self._batch
        if (epoch, batch_idx) in self._skip.positions and epoch != self._replayed_epoch:  # an older file: by position
            step.drop()
            self.skipped_batches += 1
            return
        self._window.fold(verdict)
        self._pending.append((trainer.global_step, epoch, batch_idx, verdict))
        if isinstance(verdict, list):  # decided on the host
            delivered: list[float] | None = self._pending_values()
        else:
            delivered = session_of(trainer).shared_read.take(self, trainer.global_step)
        acts = self.action != "log" or bool(self._skip.prints)
        if delivered is None and acts and not step.has_scaler:
            delivered = self._pending_values()  # alone under 32/bf16: one read per step
        if delivered is not None:
            now = delivered[-VERDICT_SIZE:]
            if now[V_DROP] > 0:
                step.drop()
                self._done = "its batch is listed in skip_batches: its update was dropped"
            elif now[V_SPIKE] > 0 and self.action != "log":
                self._act(trainer, pl_module, optimizer, step)
            elif self.action == "rollback" and not step.dropped:
                self._rollbacks.clean_step(pl_module, step.params, optimizer, checked=False)
            self._handle(trainer, delivered)
        elif step.has_scaler and acts:
            assert isinstance(verdict, Tensor)
            skip = verdict[V_DROP] > 0
            if self.action != "log":
                skip = skip | (verdict[V_SPIKE] > 0)
            _force_scaler_skip(trainer, optimizer, step, skip)  # on the device: the GradScaler skips
        if self._should_log(trainer, self.log_every_n_steps):
            if delivered is None:  # the logging step's own transfer
                delivered = self._pending_values()
                self._handle(trainer, delivered)
            metrics = {
                "gradwatch/loss_spike/z": delivered[-VERDICT_SIZE + V_Z],
                "gradwatch/loss_spike/spikes": float(len(self.spikes)),
            }
            self._log_metrics(trainer, metrics)

    # -- internals -------------------------------------------------------------------------------------------
    def _pending_values(self) -> list[float]:
        """The verdicts not read yet, on the host, flat: one reduction over ranks (max, so that every rank records
        alike; the same steps are pending on every rank) and one transfer for those on the device."""
        verdicts = [v for *_, v in self._pending]
        on_device = [v for v in verdicts if isinstance(v, Tensor)]
        fetched = iter(host_values(all_reduce_max(torch.cat(on_device)))[0] if on_device else [])
        out: list[float] = []
        for v in verdicts:
            out += v if isinstance(v, list) else [next(fetched) for _ in range(VERDICT_SIZE)]
        return out

    def _act(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, step: StepGradients
    ) -> None:
        step.drop()
        if self.action == "rollback" and self._rollbacks.restore(pl_module, step.params, optimizer):
            self._done = "the weights and optimizer state were rolled back to the last snapshot"
        else:
            self._done = "its update was dropped"

    def _handle(self, trainer: pl.Trainer, values: list[float]) -> None:
        """Record the spikes, level shifts and dropped batches among the steps read now (``values``: a verdict per
        step, in order)."""
        pending, self._pending = self._pending, []
        for i, (step, epoch, batch_idx, _) in enumerate(pending):
            verdict = values[VERDICT_SIZE * i : VERDICT_SIZE * (i + 1)]
            if verdict[V_DROP] > 0:
                self.skipped_batches += 1
            elif verdict[V_SPIKE] > 0:
                done = self._done if step == trainer.global_step else ("skipped" if self.action != "log" else "logged")
                self._record(trainer, (step, epoch, batch_idx), verdict, done)
            elif verdict[V_SHIFT] > 0:
                self._level_shift(trainer, step, verdict)
        self._done = "logged"

    def _record(self, trainer: pl.Trainer, where: tuple[int, int, int], verdict: list[float], done: str) -> None:
        step, epoch, batch_idx = where
        z, loss, median, fingerprint = verdict[V_Z], verdict[V_LOSS], verdict[V_MEDIAN], verdict[V_PRINT]
        if not math.isfinite(fingerprint) and step == trainer.global_step and self._tensor is not None:
            fingerprint = float(self._skip.fingerprint(self._tensor))  # the spike's own batch, read now (a spike step)
        spike = {"step": step, "epoch": epoch, "batch_idx": batch_idx, "loss": loss, "median": median, "z": z}
        if math.isfinite(fingerprint):
            spike["fingerprint"] = fingerprint
        self.spikes.append(spike)
        self._write_spikes(trainer)
        shifts = self._shifts
        if shifts is not None and shifts["count"] >= 2 and step - shifts["last"] <= self.window:
            shifts["last"] = step  # a step of the climb already alerted: its warning stands for it
            return
        episode = self._episode
        if episode is None or step - episode["last"] > self.window:  # a new episode
            episode = self._episode = {"first": step, "last": step, "count": 0, "gaps": 0, "alert": None}
        episode["gaps"] += int(episode["count"] > 0 and step - episode["last"] > 1)
        episode["count"] += 1
        episode["last"] = step
        # isolated spikes the run recovers from are worth knowing; spikes that keep coming (three, not all in one
        # run: a run of them is a level shift in the making) need action
        warning = episode["count"] >= 3 and episode["gaps"] >= 1
        count, first = episode["count"], episode["first"]
        span = f"at step {step}" if count == 1 else f"{count} spikes from step {first} to {step}, the latest"
        finding = (
            f"Loss spike {span} (batch {batch_idx} of epoch {epoch}): the loss {loss:.4g} is {z:.3g} robust standard "
            f"deviations above its recent median {median:.4g}; {done}. Recorded in gradwatch_spikes.json (pass it as "
            "skip_batches when resuming)."
        )
        self._report(trainer, episode, finding, z, warning)

    def _level_shift(self, trainer: pl.Trainer, step: int, verdict: list[float]) -> None:
        """The loss settled at a new level: the run of spikes that led here was that shift (if the run was the whole
        episode, its alert gives way to this one); one level after another within ``window`` steps is a loss that
        keeps climbing, a warning."""
        episode, self._episode = self._episode, None  # the spikes' episode ends with the shift
        if episode is not None and episode["gaps"] == 0 and episode["alert"] in self.alerts:
            self.alerts.remove(episode["alert"])
        n, level, median = self.level_shift_after, verdict[V_LOSS], verdict[V_MEDIAN]
        shifts = self._shifts
        if shifts is not None and step - shifts["last"] <= self.window:
            shifts["count"] += 1
            shifts["last"] = step
            finding = (
                f"The loss keeps climbing: {shifts['count']} level shifts from step {shifts['first']} to {step} (each "
                f"{n} spikes in a row; the latest level {level:.4g}, up from {median:.4g}). Training may be diverging."
            )
            self._report(trainer, shifts, finding, verdict[V_Z], warning=True)
            return
        self._shifts = {"first": step, "last": step, "count": 1, "alert": None}
        finding = (
            f"Level shift at step {step}: the loss stayed above its recent median ({median:.4g}) for {n} steps in a "
            f"row, now {level:.4g}; LossSpikeGuard takes it as the loss's new level (a change of data or curriculum) "
            "and judges later steps against it" + ("; updates are no longer dropped." if self.action != "log" else ".")
        )
        self._report(trainer, self._shifts, finding, verdict[V_Z], warning=False)

    def _report(self, trainer: pl.Trainer, episode: dict[str, Any], finding: str, z: float, warning: bool) -> None:
        """An episode's one alert: emitted at its onset, then kept up to date in place (step, count, message); it is
        emitted again, replacing its record, only when it becomes a warning."""
        old: Alert | None = episode["alert"]
        severity = "warning" if warning else "info"
        message = alert_message(AlertKind.LOSS_SPIKE, finding, severity)
        first = episode["first"]
        onset = first if first < trainer.global_step else None
        alert = Alert(trainer.global_step, AlertKind.LOSS_SPIKE, "loss", z, self.z_threshold, message, severity, onset)  # type: ignore[arg-type]
        episode["alert"] = alert
        if old is None or (warning and old.severity != "warning"):
            if old is not None and old in self.alerts:
                self.alerts.remove(old)
            self._emit_alert(trainer, alert)
        elif old in self.alerts:
            self.alerts[self.alerts.index(old)] = alert  # the same condition: its record follows it, silently
        else:
            episode["alert"] = old

    def _write_spikes(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            write_spikes(log_dir(trainer), self.spikes)

    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        charts = {"loss z-score and spikes": ["Multiline", [r"^gradwatch/loss_spike/"]]}
        return {"gradwatch: training dynamics": charts}

    # -- state -----------------------------------------------------------------------------------------------
    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"spikes": list(self.spikes), "skipped_batches": self.skipped_batches, "window": self._window.state()}

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        self.spikes = list(state.get("spikes", []))
        self.skipped_batches = int(state.get("skipped_batches", 0))
        window = state.get("window")
        if window is not None:
            self._window.load(window)
        return []


def _force_scaler_skip(
    trainer: pl.Trainer, optimizer: torch.optim.Optimizer, step: StepGradients, spike: Tensor
) -> None:
    """Under fp16, make the GradScaler skip this step when ``spike`` (a device flag), without a host sync: its
    found-inf flags when it has unscaled already, else (fused optimizers) an Inf in one gradient, which it finds."""
    if step.found_inf is not None:
        force_found_inf(trainer, optimizer, spike)
    elif step.grads:
        first = step.grads[0].view(-1)[:1]
        first.add_(torch.where(spike, float("inf"), 0.0).to(first.device, first.dtype))
