"""NaNGuard: keeps NaN/Inf out of the weights, aware of mixed precision; halts, skips or rolls back."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._precision import grad_scaler
from lightning_gradwatch._reporting import logger_step
from lightning_gradwatch._step import StepGradients, host_is_free
from lightning_gradwatch._types import FinitePositiveFloat, Null, PositiveInt
from lightning_gradwatch._validation import check_bool, check_choice, check_number
from lightning_gradwatch.alerts import Alert, AlertKind, alert_message
from lightning_gradwatch.core.callback import GradwatchCallback, HookOrder
from lightning_gradwatch.core.session import session_of
from lightning_gradwatch.functional.finite import any_non_finite
from lightning_gradwatch.guards._amp_monitor import AmpMonitor, AmpReading
from lightning_gradwatch.guards._buffer_baseline import judged_buffers, remember_buffers
from lightning_gradwatch.guards._fault_finding import FaultResponse, amp_fault_finding, fault_finding, stuck_finding
from lightning_gradwatch.guards._halt_checkpoint import Halt
from lightning_gradwatch.guards._nonfinite import (
    Fault,
    describe_fault,
    device_flag,
    half_precision_update,
    non_finite_names,
    screen_step,
    screened_tensors,
)
from lightning_gradwatch.guards._provenance import find_origin
from lightning_gradwatch.guards._snapshot import BufferShadow, Rollbacks

NanAction = Literal["halt", "skip", "rollback"]
NAN_ACTIONS: tuple[str, ...] = ("halt", "skip", "rollback")


@dataclass
class GuardTotals:
    """NaNGuard's checkpointed counters."""

    fault_steps: int = 0
    rollbacks: int = 0
    overflow_steps: int = 0
    halt_step: int | None = None  # the faulty step that stopped the run
    halt_checkpoint: str | None = None


class NaNGuard(GradwatchCallback):
    r"""Guard a run against NaN/Inf: check the loss and the gradients on every optimizer step (the weights, buffers
    and optimizer state at a cadence and on every fault), and never let a non-finite update reach the weights nor a
    non-finite state be saved, snapshotted or restored as good.

    **Actions** on a fault (a non-finite loss, gradient, weight, buffer or optimizer state):

    - ``"halt"`` (default): drop this update, undo the batch's update of the module buffers (BatchNorm running
      statistics, updated by its forward pass), stop the Trainer cleanly (every rank at the same step), and save
      ``gradwatch-halt-step=N.ckpt`` next to the ModelCheckpoint's files - only if the state is finite; otherwise
      say plainly that no clean state exists.
    - ``"skip"``: drop this update, undo the buffers' update, and go on. Non-finite weights or optimizer state
      cannot be repaired by skipping: then it halts.
    - ``"rollback"``: restore the last snapshot (weights, buffers, optimizer state; taken every
      ``snapshot_every_n_steps`` clean steps, and only of a finite state), drop this update and go on; halt when
      the same snapshot has been restored ``max_rollbacks`` times without ``snapshot_every_n_steps`` clean steps in
      between. The step counter, the LR schedule and the data order go on. Under ``16-mixed`` the GradScaler has
      already skipped a faulty update, so a fault there is handled like ``"skip"``.

    **Mixed precision.** Under ``16-mixed`` an overflow-skipped step is normal: it is counted without an alert from
    the scaler's own found-inf flag (no host sync) and the counters are read every ``amp_check_every_n_steps``;
    then a non-finite loss is a fault, and a collapsing scale (below ``min_loss_scale``, or
    ``max_consecutive_overflows`` skips in a row) is ``loss_scale_collapse``, which always halts. Under
    ``bf16-mixed`` and ``32-true`` every step costs one reduced flag and one host read.

    **Distributed.** Flags are all-reduced (max) across ranks: every rank takes the same action at the same step.

    Args:
        action: ``"halt"``, ``"skip"`` or ``"rollback"``.
        check_params_every_n_steps: also check weights and optimizer state every this many steps; ``None`` never
            (they are still checked at the first step of each fit, on every fault and before every snapshot).
        snapshot_every_n_steps: with ``"rollback"``, copy the state every this many clean steps (a copy of
            weights, buffers and optimizer state in device memory).
        max_rollbacks: with ``"rollback"``, halt when a fault would restore the same snapshot more than this
            many times.
        min_loss_scale: fp16 only: a loss scale below this floor is a collapse.
        max_consecutive_overflows: fp16 only: this many overflow-skipped steps in a row is a collapse.
        max_consecutive_faults: with ``"skip"``, this many faulty steps in a row is a stuck run: it halts (skipping
            is for the odd bad batch; a run whose every step is faulty goes nowhere).
        amp_check_every_n_steps: fp16 only: read the device-side counters every this many steps.
        log_every_n_steps: log the counters every this many steps; ``None`` follows the Trainer.
        save_checkpoint_on_halt: on halt, save the last good state next to the ModelCheckpoint's files.

    Raises:
        ValueError: an argument outside its range, naming it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import NaNGuard

        trainer = Trainer(callbacks=[NaNGuard(action="rollback")], precision="16-mixed")
    """

    hook_order = HookOrder.NAN_GUARD
    single_instance = True
    reads_every_step = True

    def __init__(
        self,
        action: NanAction = "halt",
        check_params_every_n_steps: PositiveInt | Null = 100,
        snapshot_every_n_steps: PositiveInt = 50,
        max_rollbacks: PositiveInt = 3,
        min_loss_scale: FinitePositiveFloat = 1.0,
        max_consecutive_overflows: PositiveInt = 30,
        max_consecutive_faults: PositiveInt = 20,
        amp_check_every_n_steps: PositiveInt = 10,
        log_every_n_steps: PositiveInt | Null = None,
        save_checkpoint_on_halt: bool = True,
    ) -> None:
        super().__init__()
        self.action: NanAction = check_choice("action", action, NAN_ACTIONS)
        positive_int: dict[str, Any] = {"ge": 1, "integer": True}
        self.check_params_every_n_steps = check_number(
            "check_params_every_n_steps", check_params_every_n_steps, optional=True, **positive_int
        )
        self.snapshot_every_n_steps = check_number("snapshot_every_n_steps", snapshot_every_n_steps, **positive_int)
        self.max_rollbacks = check_number("max_rollbacks", max_rollbacks, **positive_int)
        self.min_loss_scale = check_number("min_loss_scale", min_loss_scale, gt=0, finite=True)
        self.max_consecutive_overflows = check_number(
            "max_consecutive_overflows", max_consecutive_overflows, **positive_int
        )
        self.max_consecutive_faults = check_number("max_consecutive_faults", max_consecutive_faults, **positive_int)
        self.amp_check_every_n_steps = check_number("amp_check_every_n_steps", amp_check_every_n_steps, **positive_int)
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, optional=True, **positive_int)
        self.save_checkpoint_on_halt = check_bool("save_checkpoint_on_halt", save_checkpoint_on_halt)
        self.totals = GuardTotals()
        self._amp = AmpMonitor()
        self._shadow = BufferShadow()
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What lives only for one fit: the loss flag, snapshots, the halt state."""
        self._loss_bad: Tensor | bool | None = None  # a device flag, or a bool where the host reads for free
        self._amp.reset()
        self._rollbacks = Rollbacks(self.snapshot_every_n_steps, self.max_rollbacks)
        self._halt = Halt()
        self._faults_in_a_row = 0
        self._batches: list[tuple[Any, int]] = []
        self._batches_step = -1
        self._screened_optimizers: set[int] = set()  # whose weights and state were checked this fit

    @property
    def fault_steps(self) -> int:
        """Optimizer steps found faulty so far."""
        return self.totals.fault_steps

    @property
    def rollbacks(self) -> int:
        return self.totals.rollbacks

    @property
    def overflow_steps(self) -> int:
        """fp16: overflow-skipped steps so far (counted at each reading)."""
        return self.totals.overflow_steps

    @property
    def halt_step(self) -> int | None:
        """The faulty step that stopped the run, if one did."""
        return self.totals.halt_step

    @property
    def stopped_this_fit(self) -> bool:
        """Whether this guard stopped the current (or last) fit; ``halt_step`` may be a restored earlier halt's."""
        return self._halt.halted

    @property
    def halt_checkpoint(self) -> str | None:
        """Where the last good state was saved on halt, if it was."""
        return self.totals.halt_checkpoint

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_run_state()
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the buffers to go back to if the first step's forward pass poisons them; later, each clean check's
        self._shadow.refresh(pl_module)
        remember_buffers(pl_module)  # what the buffers hold by design (a causal mask's -inf) is not a fault

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # references to this optimizer step's batches (no copy): where a fault began is traced from them
        if self._batches_step != trainer.global_step:
            self._batches, self._batches_step = [], trainer.global_step
        self._batches.append((batch, batch_idx))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        if not trainer.training:
            return
        loss = loss.detach()  # scaled under fp16: non-finite iff the loss is (or is absurd)
        if host_is_free(loss.device):  # a CPU: read for free, no tensor op
            self._loss_bad = not math.isfinite(float(loss)) or bool(self._loss_bad)
            return
        bad = ~torch.isfinite(loss)
        before = self._loss_bad
        self._loss_bad = bad if not isinstance(before, Tensor) else before | bad.to(before.device)

    @override
    def _before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
    ) -> None:
        if self._halt.halted:  # halted, but the loop goes on (min_steps/min_epochs not met): no update lands
            self._loss_bad = None
            step.drop()
            trainer.should_stop = True
            return
        if not step.grads:
            return
        flag = self._loss_bad if self._loss_bad is not None else False
        self._loss_bad = None
        if step.has_scaler:
            self._amp_step(trainer, pl_module, optimizer, step, device_flag(flag, step.device))
        else:
            self._check_step(trainer, pl_module, optimizer, step, flag)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._halt.pending is not None:
            # the fault episode ends with this run (and is saved so): a run resumed from the checkpoint alerts again
            self._clear_condition(AlertKind.NON_FINITE, "")
            self._clear_condition(AlertKind.LOSS_SCALE_COLLAPSE, "")
            self._halt.carry_out(trainer, pl_module, self.totals, self.save_checkpoint_on_halt)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # -- 32 / bf16: one reduced flag and one host read per step ----------------------------------------------
    def _check_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
        loss_bad: Tensor | bool,
    ) -> None:
        snapshot_due = self.action == "rollback" and self._rollbacks.due_for(optimizer)
        # the first step of a fit too: a checkpoint resumed from may hold a NaN weight or Adam moment
        first = id(optimizer) not in self._screened_optimizers
        self._screened_optimizers.add(id(optimizer))
        state_due = snapshot_due or first or self._due(trainer, self.check_params_every_n_steps)
        # buffers every step (they are small, and a NaN there is invisible until evaluation); weights and
        # optimizer state at the cadence and before a snapshot
        state = screened_tensors(pl_module, optimizer, step, weights=state_due, optimizer_state=state_due)
        read = session_of(trainer).shared_read
        loss_is_bad, grads_are_bad, state_is_bad = screen_step(
            step, loss_bad, state, lambda flags: read.read(trainer.global_step, flags)
        )
        if not (loss_is_bad or grads_are_bad or state_is_bad):
            self._faults_in_a_row = 0
            self._clear_condition(AlertKind.NON_FINITE, "")
            self._shadow.refresh(pl_module)  # checked finite: the buffers to go back to if the next batch poisons them
            if self.action == "rollback":  # a due snapshot's state was just checked finite: safe to keep
                self._rollbacks.clean_step(pl_module, step.params, optimizer)
            if self._should_log(trainer, self.log_every_n_steps):
                self._log_counters(trainer)
            return
        self._on_fault(trainer, pl_module, optimizer, step, loss_is_bad, grads_are_bad)

    def _on_fault(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
        loss_bad: bool,
        grads_bad: bool,
    ) -> None:
        fault = describe_fault(pl_module, optimizer, step, loss_bad, grads_bad)
        origin = find_origin(trainer, pl_module, self._batches, fault.gradients) if not fault.poisoned_state else None
        step.drop()
        self._shadow.restore()  # the batch's forward pass (and the replay's) updated the running statistics: undo it
        # buffers poisoned before this step are non-finite in the copy too: only a snapshot repairs them
        unrepaired = non_finite_names(judged_buffers(pl_module)) if fault.buffers else []
        if not step.repeat:
            self.totals.fault_steps += 1
            self._faults_in_a_row += 1
        action: str = self.action  # what this fault gets: the configured action, or halt
        stuck = action == "skip" and self._faults_in_a_row >= self.max_consecutive_faults
        also: list[int] | None = []
        if action == "rollback":
            also = self._rollbacks.restore_holding(
                pl_module, step.params, optimizer, fault.weights, step.index.names, trainer.optimizers
            )
            action = "rollback" if also is not None else "halt"
            self.totals.rollbacks += also is not None
        elif fault.poisoned_state or unrepaired or stuck:
            action = "halt"  # skipping cannot repair weights, buffers or optimizer state already non-finite
        response = FaultResponse(action, self.rollbacks, tuple(also or ()), tuple(unrepaired))
        finding, cause = fault_finding(
            trainer.global_step,
            fault,
            response,
            origin,
            session_of(trainer).loss_trace.host().divergence(),
            half_precision_update(optimizer, step) if fault.weights else None,
        )
        self._alert_non_finite(trainer, fault, finding, cause=cause)
        if stuck:
            message = alert_message(
                AlertKind.NON_FINITE, stuck_finding(trainer.global_step, self._faults_in_a_row, fault)
            )
            value, limit = float(self._faults_in_a_row), float(self.max_consecutive_faults)
            alert = Alert(
                trainer.global_step, AlertKind.NON_FINITE, fault.first_layer, value, limit, message, cause=cause
            )
            self._emit_alert(trainer, alert)
            self._halt.request(trainer, f"stuck: {self._faults_in_a_row} faulty steps in a row", self.totals)
        elif action == "halt":
            self._halt.request(trainer, f"non-finite values ({fault.text})", self.totals)
        self._log_counters(trainer)

    # -- fp16: count on the device, read at a cadence --------------------------------------------------------
    def _amp_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
        loss_bad: Tensor,
    ) -> None:
        scaler = grad_scaler(trainer)
        assert scaler is not None
        self._amp.observe(scaler, step.found_inf, loss_bad, step.device)
        log_now = self._should_log(trainer, self.log_every_n_steps)
        if not (log_now or self._due(trainer, self.amp_check_every_n_steps)):
            return
        check_state = self._due(trainer, self.check_params_every_n_steps)
        state = screened_tensors(pl_module, optimizer, step, weights=check_state, optimizer_state=False)
        state_flag = any_non_finite(state, step.device).reshape(1).float().to(step.device)
        reading = self._amp.read_riding(scaler, state_flag, session_of(trainer).shared_read, trainer.global_step)
        self.totals.overflow_steps += reading.overflows
        if log_now:
            amp = {
                "gradwatch/amp/loss_scale": reading.scale,
                "gradwatch/amp/consecutive_overflows": reading.consecutive,
            }
            self._log_counters(trainer, amp)
        state_bad = reading.extra[0] > 0
        collapsed = self._check_collapse(trainer, reading)
        if reading.loss_faults or state_bad:
            self._shadow.restore()  # a non-finite forward pass may have poisoned the running statistics
            self.totals.fault_steps += reading.loss_faults + int(state_bad)
            fault = describe_fault(pl_module, optimizer, step, bool(reading.loss_faults), False) if state_bad else None
            what = fault.text if fault else f"the loss was non-finite on {reading.loss_faults} step(s)"
            acts = self.action == "halt" or state_bad
            message = amp_fault_finding(trainer.global_step, what, acts)
            self._alert_non_finite(trainer, fault, message, loss_faults=reading.loss_faults)
            if acts:
                step.drop()
                self._halt.request(trainer, what, self.totals)
        elif not collapsed:
            self._shadow.refresh(pl_module)  # a clean reading: the buffers are a good copy to go back to
            self._clear_condition(AlertKind.NON_FINITE, "")
            self._clear_condition(AlertKind.LOSS_SCALE_COLLAPSE, "")

    def _check_collapse(self, trainer: pl.Trainer, reading: AmpReading) -> bool:
        found = reading.collapse_alert(trainer.global_step, self.min_loss_scale, self.max_consecutive_overflows)
        if found is None:
            return False
        alert, reason = found
        self._set_condition(trainer, AlertKind.LOSS_SCALE_COLLAPSE, "", True, lambda: alert)
        self._halt.request(trainer, f"loss-scale collapse ({reason})", self.totals)
        return True

    # -- shared ----------------------------------------------------------------------------------------------
    @staticmethod
    def _due(trainer: pl.Trainer, every: int | None) -> bool:
        return every is not None and (logger_step(trainer) + 1) % every == 0

    def _alert_non_finite(
        self, trainer: pl.Trainer, fault: Fault | None, finding: str, loss_faults: int = 0, cause: str = ""
    ) -> None:
        """A ``non_finite`` alert, once per fault episode (consecutive faulty steps or checks)."""
        step = trainer.global_step
        name = fault.first_layer if fault is not None else "loss"
        value = float(fault.count if fault is not None else loss_faults)
        message = alert_message(AlertKind.NON_FINITE, finding, cause=cause)
        self._set_condition(
            trainer,
            AlertKind.NON_FINITE,
            "",
            True,
            lambda: Alert(step, AlertKind.NON_FINITE, name, value, 0.0, message, cause=cause),
        )

    def _log_counters(self, trainer: pl.Trainer, extra: dict[str, float] | None = None) -> None:
        metrics = {
            "gradwatch/guard/faults": float(self.totals.fault_steps),
            "gradwatch/guard/rollbacks": float(self.totals.rollbacks),
        }
        if grad_scaler(trainer) is not None:
            metrics["gradwatch/amp/overflow_steps"] = float(self.totals.overflow_steps)
        metrics.update(extra or {})
        self._log_metrics(trainer, metrics)

    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        charts: dict[str, list[Any]] = {"faults and rollbacks": ["Multiline", [r"^gradwatch/guard/"]]}
        if grad_scaler(trainer) is not None:
            charts["loss scale"] = ["Multiline", [r"^gradwatch/amp/loss_scale$"]]
            charts["overflow-skipped steps"] = [
                "Multiline",
                [r"^gradwatch/amp/(overflow_steps|consecutive_overflows)$"],
            ]
        return {"gradwatch: guard": charts}

    # -- state -----------------------------------------------------------------------------------------------
    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"totals": asdict(self.totals)}

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        # counters carry over whatever the arguments; older checkpoints kept them at the top level
        saved = state.get("totals", state)
        self.totals = GuardTotals(**{k: saved[k] for k in asdict(GuardTotals()) if k in saved})
        return []
