"""LossSpikeGuard: a training loss far above its recent history is a spike: log it, skip its update, or roll back."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._base import GradwatchCallback, gradwatch_callbacks
from lightning_gradwatch._distributed import all_reduce_max
from lightning_gradwatch._precision import grad_scaler, unscaled_loss
from lightning_gradwatch._reporting import host_values, log_dir
from lightning_gradwatch._shared_read import shared_read
from lightning_gradwatch._snapshot import Rollbacks
from lightning_gradwatch._step import StepGradients, host_is_free
from lightning_gradwatch._types import AtLeastThreeInt, Null, PositiveFloat, PositiveInt
from lightning_gradwatch._validation import check_choice, check_number
from lightning_gradwatch.alerts import Alert, AlertKind, with_remedy
from lightning_gradwatch.functional.clipping import ring_push
from lightning_gradwatch.functional.spikes import robust_zscore, robust_zscore_of_floats

SpikeAction = Literal["log", "skip", "rollback"]
SPIKE_ACTIONS: tuple[str, ...] = ("log", "skip", "rollback")


class LossSpikeGuard(GradwatchCallback):
    r"""Catch loss spikes: a step whose training loss lies more than ``z_threshold`` robust standard deviations above
    the median of the last ``window`` steps (``1.4826 * MAD``: the spikes themselves do not widen it; OLMo-core uses
    mean + 6 sigma over 128 steps), once ``warmup_steps`` losses are known.

    **Actions**: ``"log"`` (alert and record), ``"skip"`` (drop the update exactly: the optimizer does not step, its
    state is untouched), ``"rollback"`` (restore the last snapshot of weights, buffers and optimizer state, taken
    every ``snapshot_every_n_steps`` spike-free steps, with NaNGuard's snapshot machinery). Spikes never enter the
    window. Every spike's step and its batch (index in the epoch) is recorded in ``gradwatch_spikes.json`` next to
    the logs; pass that file as ``skip_batches`` when resuming to drop those batches' updates (the PaLM recipe: rewind
    before the spike and skip the data that caused it).

    **No host sync of its own where it can be avoided.** The spike flag is decided on the device and reduced over
    ranks (every rank decides alike). Under ``32-true``/``bf16-mixed`` it rides on NaNGuard's one read per step when
    NaNGuard is there (so with both, a step still costs one sync); alone, ``"skip"`` and ``"rollback"`` read it
    (one sync per step) and ``"log"`` reads spikes at logging steps. Under ``16-mixed`` ``"skip"`` makes the
    GradScaler skip the step on the device (no sync), and ``"rollback"`` acts as ``"skip"``. On a CPU, where a host
    read costs nothing, a single process keeps the window as Python floats and decides every step on the host
    (the same median, MAD and threshold), so every action, ``"log"`` included, sees a spike at its own step.

    Alerts ``loss_spike`` (info for an isolated spike the run recovers from; a warning when they repeat).
    Logs ``gradwatch/loss_spike/z`` (the step's z-score) and ``gradwatch/loss_spike/spikes`` (cumulative).
    Automatic optimization only (manual optimization mixes several losses): idle with one warning otherwise.

    Args:
        action: ``"log"``, ``"skip"`` or ``"rollback"``.
        z_threshold: robust standard deviations above the median that make a spike.
        window: how many recent losses the median and MAD are taken over.
        warmup_steps: losses gathered before any spike is called (a young run's loss falls fast).
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

    hook_order = 5  # after NaNGuard, before the norm logger and clipping: a dropped update is never measured
    single_instance = True

    def __init__(
        self,
        action: SpikeAction = "log",
        z_threshold: PositiveFloat = 6.0,
        window: AtLeastThreeInt = 128,
        warmup_steps: PositiveInt = 50,
        snapshot_every_n_steps: PositiveInt = 50,
        max_rollbacks: PositiveInt = 3,
        skip_batches: str | os.PathLike[str] | None = None,
        log_every_n_steps: PositiveInt | Null = None,
    ) -> None:
        super().__init__()
        self.action: SpikeAction = check_choice("action", action, SPIKE_ACTIONS)
        self.z_threshold = check_number("z_threshold", z_threshold, gt=0)
        self.window = check_number("window", window, ge=3, integer=True)
        self.warmup_steps = check_number("warmup_steps", warmup_steps, ge=1, integer=True)
        self.snapshot_every_n_steps = check_number("snapshot_every_n_steps", snapshot_every_n_steps, ge=1, integer=True)
        self.max_rollbacks = check_number("max_rollbacks", max_rollbacks, ge=1, integer=True)
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, ge=1, integer=True, optional=True)
        self.skip_batches = _load_batches(skip_batches)
        self.spikes: list[dict[str, Any]] = []  # every spike found: step, epoch, batch_idx, loss, median, z
        self.skipped_batches = 0
        # the window (a ring buffer) and how many it holds: on the device, or a list on the CPU's host path
        self._losses: Tensor | list[float] | None = None
        self._count: Tensor | int = 0
        self._loss: Tensor | float | None = None  # this step's loss, summed over its micro-batches
        self._verdict: Tensor | list[float] | None = None  # [spike, z, loss, median] of this step
        self._pending: list[tuple[int, int, int, Tensor | list[float]]] = []  # (step, epoch, batch_idx, verdict)
        self._done = "logged"  # what this step's action did, for its record
        self._batch: tuple[int, int] = (0, 0)
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
        if not self._active:
            rank_zero_warn("LossSpikeGuard is idle: it watches automatic optimization only (one loss per step).")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = (trainer.current_epoch, batch_idx)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not (self._active and trainer.training):
            return
        device_value = unscaled_loss(trainer, loss)  # the loss is scaled under fp16
        if host_is_free(loss.device) and trainer.world_size == 1:  # a CPU: decide on the host, in microseconds
            value = float(device_value)
            self._loss = value if self._loss is None else self._loss + value  # micro-batches: each is loss / A
            self._verdict = self._judge_on_host(self._loss)
            return
        self._loss = device_value if not isinstance(self._loss, Tensor) else self._loss + device_value
        self._verdict = self._judge(self._loss)
        if grad_scaler(trainer) is not None and trainer.world_size > 1:  # the device-side skip: the same on every rank
            self._verdict = torch.cat([all_reduce_max(self._verdict[:1]), self._verdict[1:]])
        if any(cb.reads_every_step for cb in gradwatch_callbacks(trainer)):
            # ride on NaNGuard's read (max over ranks): this step's verdict and any not read yet
            unread = [v for *_, v in self._pending if isinstance(v, Tensor)] + [self._verdict]
            shared_read(trainer).post(self, torch.cat(unread), trainer.global_step)

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
        verdict, self._loss, self._verdict = self._verdict, None, None
        if step.repeat or not step.grads or verdict is None:
            return
        epoch, batch_idx = self._batch
        if (epoch, batch_idx) in self.skip_batches:  # known on the host: drop it, no sync
            step.drop()
            self.skipped_batches += 1
            return
        self._fold(verdict)
        self._pending.append((trainer.global_step, epoch, batch_idx, verdict))
        if isinstance(verdict, list):  # decided on the host
            delivered: list[float] | None = self._pending_values()
        else:
            delivered = shared_read(trainer).take(self, trainer.global_step)
        if delivered is None and self.action != "log" and not step.has_scaler:
            if trainer.world_size > 1:
                self._pending[-1] = (*self._pending[-1][:3], torch.cat([all_reduce_max(verdict[:1]), verdict[1:]]))
            delivered = self._pending_values()  # alone under 32/bf16: one read per step
        if delivered is not None:
            if delivered[-4] > 0 and self.action != "log":
                self._act(trainer, pl_module, optimizer, step)
            elif self.action == "rollback" and not step.dropped:
                self._rollbacks.clean_step(pl_module, step.params, optimizer)
            self._handle(trainer, delivered)
        elif step.has_scaler and self.action != "log":
            assert isinstance(verdict, Tensor)
            _force_scaler_skip(trainer, optimizer, step, verdict[0] > 0)  # on the device: the GradScaler skips
        if self._should_log(trainer, self.log_every_n_steps):
            if delivered is None:  # the logging step's own transfer
                delivered = self._pending_values()
                self._handle(trainer, delivered)
            metrics = {"gradwatch/loss_spike/z": delivered[-3], "gradwatch/loss_spike/spikes": float(len(self.spikes))}
            self._log_metrics(trainer, metrics)

    # -- internals -------------------------------------------------------------------------------------------
    def _judge(self, loss: Tensor) -> Tensor:
        """``[spike, z, loss, median]`` of this step, on the device."""
        if not isinstance(self._losses, Tensor) or self._losses.device != loss.device:
            self._losses, self._count = _window_tensors(self._losses, self._count, self.window, loss.device)
        assert isinstance(self._count, Tensor)
        z, median, _ = robust_zscore(self._losses, self._count, loss)
        spike = (self._count >= self.warmup_steps) & (z > self.z_threshold) & torch.isfinite(loss)
        return torch.stack([spike.float(), z, loss, median])

    def _judge_on_host(self, loss: float) -> list[float]:
        """:meth:`_judge` on the host, with the window as a list."""
        if not isinstance(self._losses, list):
            self._losses, self._count = _window_floats(self._losses, self._count, self.window)
        count = int(self._count)
        z, median, _ = robust_zscore_of_floats(self._losses[: min(count, self.window)], loss)
        spike = count >= self.warmup_steps and z > self.z_threshold and math.isfinite(loss)
        return [float(spike), z, loss, median]

    def _fold(self, verdict: Tensor | list[float]) -> None:
        if isinstance(verdict, list):
            assert isinstance(self._losses, list)
            if verdict[0] == 0 and math.isfinite(verdict[2]):  # spikes (and NaN, NaNGuard's) never widen the window
                self._losses[int(self._count) % self.window] = verdict[2]
                self._count = int(self._count) + 1
            return
        assert isinstance(self._losses, Tensor) and isinstance(self._count, Tensor)
        valid = (verdict[0] == 0) & torch.isfinite(verdict[2])
        self._losses, self._count = ring_push(self._losses, self._count, verdict[2], valid)

    def _pending_values(self) -> list[float]:
        """The verdicts not read yet, on the host, flat (four per step): one transfer for those on the device."""
        verdicts = [v for *_, v in self._pending]
        fetched = iter(host_values(*(v for v in verdicts if isinstance(v, Tensor))))
        return [x for v in verdicts for x in (v if isinstance(v, list) else next(fetched))]

    def _act(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, step: StepGradients
    ) -> None:
        step.drop()
        if self.action == "rollback" and self._rollbacks.restore(pl_module, step.params, optimizer):
            self._done = "the weights and optimizer state were rolled back to the last snapshot"
        else:
            self._done = "its update was dropped"

    def _handle(self, trainer: pl.Trainer, values: list[float]) -> None:
        """Record the spikes among the steps read now (``values``: four per step, in order)."""
        pending, self._pending = self._pending, []
        for i, (step, epoch, batch_idx, _) in enumerate(pending):
            spike, z, loss, median = values[4 * i : 4 * i + 4]
            if spike > 0:
                done = self._done if step == trainer.global_step else ("skipped" if self.action != "log" else "logged")
                self._record(trainer, (step, epoch, batch_idx), [spike, z, loss, median], done)
        self._done = "logged"

    def _record(self, trainer: pl.Trainer, where: tuple[int, int, int], values: list[float], done: str) -> None:
        step, epoch, batch_idx = where
        _, z, loss, median = values
        self.spikes.append(
            {"step": step, "epoch": epoch, "batch_idx": batch_idx, "loss": loss, "median": median, "z": z}
        )
        recent = [s for s in self.spikes if s["step"] > step - 100]
        severity = "warning" if len(recent) >= 3 else "info"  # an isolated spike the run recovers from: worth knowing
        finding = (
            f"Loss spike at step {step} (batch {batch_idx} of epoch {epoch}): the loss {loss:.4g} is {z:.3g} robust "
            f"standard deviations above its recent median {median:.4g}; {done}. {len(recent)} spike(s) in the last 100 "
            "steps, recorded in gradwatch_spikes.json (pass it as skip_batches when resuming)."
        )
        message = with_remedy(AlertKind.LOSS_SPIKE, finding) if severity == "warning" else finding
        onset = step if step < trainer.global_step else None
        alert = Alert(trainer.global_step, AlertKind.LOSS_SPIKE, "loss", z, self.z_threshold, message, severity, onset)  # type: ignore[arg-type]
        self._emit_alert(trainer, alert)
        if trainer.is_global_zero:
            directory = log_dir(trainer)
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "gradwatch_spikes.json"), "w") as f:
                json.dump({"spikes": self.spikes}, f, indent=2)

    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        charts = {"loss z-score and spikes": ["Multiline", [r"^gradwatch/loss_spike/"]]}
        return {"gradwatch: training dynamics": charts}

    # -- state -----------------------------------------------------------------------------------------------
    @override
    def _extra_state(self) -> dict[str, Any]:
        window = None
        if self._losses is not None:
            losses, count = _window_tensors(self._losses, self._count, self.window, torch.device("cpu"))
            window = {"losses": losses.clone(), "count": count.clone()}
        return {"spikes": list(self.spikes), "skipped_batches": self.skipped_batches, "window": window}

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        self.spikes = list(state.get("spikes", []))
        self.skipped_batches = int(state.get("skipped_batches", 0))
        window = state.get("window")
        if window is not None and window["losses"].numel() == self.window:
            self._losses, self._count = window["losses"], window["count"]
        return []


def _window_tensors(
    losses: Tensor | list[float] | None, count: Tensor | int, size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    if losses is None:
        return torch.zeros(size, device=device), torch.zeros((), dtype=torch.int64, device=device)
    return (
        torch.as_tensor(losses, dtype=torch.float32).to(device),
        torch.as_tensor(count, dtype=torch.int64).to(device),
    )


def _window_floats(losses: Tensor | list[float] | None, count: Tensor | int, size: int) -> tuple[list[float], int]:
    if losses is None:
        return [0.0] * size, 0
    return (losses.tolist() if isinstance(losses, Tensor) else list(losses)), int(count)


def _force_scaler_skip(
    trainer: pl.Trainer, optimizer: torch.optim.Optimizer, step: StepGradients, spike: Tensor
) -> None:
    """Under fp16, make the GradScaler skip this step when ``spike`` (a device flag), without a host sync: its
    found-inf flags when it has unscaled already, else (fused optimizers) an Inf in one gradient, which it finds."""
    if step.found_inf is not None:
        scaler = grad_scaler(trainer)
        assert scaler is not None
        for flag in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            flag.copy_(torch.maximum(flag, spike.to(flag.device, flag.dtype)))
    elif step.grads:
        first = step.grads[0].view(-1)[:1]
        first.add_(torch.where(spike, float("inf"), 0.0).to(first.device, first.dtype))


def _load_batches(path: str | os.PathLike[str] | None) -> set[tuple[int, int]]:
    if path is None:
        return set()
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`skip_batches` must be a path to a gradwatch_spikes.json or None, got {path!r}.")
    try:
        with open(path) as f:
            spikes = json.load(f)["spikes"]
        return {(int(s["epoch"]), int(s["batch_idx"])) for s in spikes}
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"`skip_batches` must be a readable gradwatch_spikes.json, got {path!r}: {err}") from err
