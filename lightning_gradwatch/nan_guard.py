"""NaNGuard: keeps NaN/Inf out of the weights, aware of mixed precision; halts, skips or rolls back."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._core import (
    GradwatchCallback,
    ParamGroups,
    all_reduce_max,
    check_positive,
    check_positive_int,
    clean_name,
    grad_scaler,
    host_values,
    layer_of,
    local_tensor,
    log,
    logger_step,
    scaler_found_inf,
)
from lightning_gradwatch.alerts import Alert, AlertKind
from lightning_gradwatch.functional.finite import any_non_finite, may_be_non_finite, non_finite_mask

_ACTIONS = ("halt", "skip", "rollback")


class NaNGuard(GradwatchCallback):
    r"""Guard a run against NaN/Inf: check the loss and the gradients on every optimizer step (and the weights at a
    cadence), and never let a non-finite update reach the weights.

    **Actions** on a fault (a non-finite loss, gradient or weight):

    - ``"halt"`` (default): drop this update, stop the Trainer cleanly (every rank at the same step, no
      traceback), save a checkpoint of the last good state when a checkpoint directory is known, and say where it
      is and how to resume.
    - ``"skip"``: drop this update and go on.
    - ``"rollback"``: restore the last known-good weights, module buffers (BatchNorm running statistics, which
      the bad batch's forward pass has already updated) and optimizer state kept in memory (a snapshot taken
      every ``snapshot_every_n_steps`` clean steps), drop this update and go on; halt when the same snapshot has
      been restored ``max_rollbacks`` times without ``snapshot_every_n_steps`` clean steps in between. The step
      counter, the LR schedule (the optimizer's hyperparameters are not rolled back) and the data order go on.
      Under ``16-mixed`` the GradScaler has already skipped a faulty update, so a fault there is handled like
      ``"skip"`` (non-finite weights still halt).

    **Mixed precision.** Under ``16-mixed`` a step whose gradients overflowed is normal: the GradScaler skips it
    and halves the scale. The guard counts such steps without an alert, reusing the scaler's own found-inf flag
    (so it adds no host sync), and logs the loss scale and the skipped steps. Its device-side counters are read
    every ``amp_check_every_n_steps`` steps: then a non-finite *loss* is a fault (``non_finite``; the scaler has
    already skipped those updates, so the weights are safe) and a collapsing scale (below ``min_loss_scale``, or
    ``max_consecutive_overflows`` overflow skips in a row) is ``loss_scale_collapse``, which always halts: no
    amount of skipping repairs it. Fused optimizers (gradients still scaled in the hook) are handled. Under
    ``bf16-mixed`` and ``32-true`` there is no scaler and any non-finite gradient is a fault, checked on every
    step with one reduced flag and one host sync.

    **Distributed.** The decision is collective: the step's flags are all-reduced (max) across ranks, so when one
    rank sees a non-finite loss, every rank takes the same action at the same step.

    Logged metrics: ``gradwatch/guard/faults`` (cumulative faulty steps), ``gradwatch/guard/rollbacks``, and under
    fp16 ``gradwatch/amp/loss_scale``, ``gradwatch/amp/overflow_steps`` (cumulative) and
    ``gradwatch/amp/consecutive_overflows``.

    Args:
        action: ``"halt"``, ``"skip"`` or ``"rollback"``.
        check_params_every_n_steps: also check the weights themselves every this many steps; ``None`` never.
        snapshot_every_n_steps: with ``"rollback"``, copy the weights and optimizer state every this many clean
            steps (each snapshot costs a copy of both, in device memory).
        max_rollbacks: with ``"rollback"``, halt when a fault would restore the same snapshot more than this
            many times.
        min_loss_scale: fp16 only: a loss scale below this floor is a collapse.
        max_consecutive_overflows: fp16 only: this many overflow-skipped steps in a row is a collapse.
        amp_check_every_n_steps: fp16 only: read the device-side counters every this many steps (the bound on
            how late a non-finite loss or a collapse is acted on).
        log_every_n_steps: log the counters every this many steps; ``None`` follows the Trainer.
        save_checkpoint_on_halt: on halt, save the last good state next to the ModelCheckpoint's files.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import NaNGuard

        trainer = Trainer(callbacks=[NaNGuard(action="rollback")], precision="16-mixed")
    """

    hook_order = 0

    def __init__(
        self,
        action: Literal["halt", "skip", "rollback"] = "halt",
        check_params_every_n_steps: int | None = 100,
        snapshot_every_n_steps: int = 50,
        max_rollbacks: int = 3,
        min_loss_scale: float = 1.0,
        max_consecutive_overflows: int = 30,
        amp_check_every_n_steps: int = 10,
        log_every_n_steps: int | None = None,
        save_checkpoint_on_halt: bool = True,
    ) -> None:
        super().__init__()
        if action not in _ACTIONS:
            raise ValueError(f"`action` must be one of {', '.join(map(repr, _ACTIONS))}, got {action!r}.")
        check_positive_int("check_params_every_n_steps", check_params_every_n_steps, allow_none=True)
        check_positive_int("snapshot_every_n_steps", snapshot_every_n_steps)
        check_positive_int("max_rollbacks", max_rollbacks)
        check_positive("min_loss_scale", min_loss_scale)
        if math.isinf(min_loss_scale):
            raise ValueError(f"`min_loss_scale` must be a finite number > 0, got {min_loss_scale!r}.")
        check_positive_int("max_consecutive_overflows", max_consecutive_overflows)
        check_positive_int("amp_check_every_n_steps", amp_check_every_n_steps)
        check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.action = action
        self.check_params_every_n_steps = check_params_every_n_steps
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.max_rollbacks = max_rollbacks
        self.min_loss_scale = float(min_loss_scale)
        self.max_consecutive_overflows = max_consecutive_overflows
        self.amp_check_every_n_steps = amp_check_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.save_checkpoint_on_halt = save_checkpoint_on_halt

        # host-side totals (checkpointed)
        self.fault_steps = 0
        self.rollbacks = 0
        self.overflow_steps = 0
        self.halt_checkpoint: str | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What lives only for one fit: device-side flags and counters (no sync), snapshots, the halt state."""
        self._loss_bad: Tensor | None = None
        self._amp: dict[str, Tensor] = {}
        self._snapshot: _Snapshot | None = None
        self._rollbacks_to_snapshot = 0
        self._clean_steps_since_snapshot = 0
        self._halt_pending: str | None = None
        self._halted = False

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
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not trainer.training:
            return
        bad = ~torch.isfinite(loss.detach())  # scaled under fp16: non-finite iff the loss is (or is absurd)
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad.to(self._loss_bad.device)

    @override
    def _before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        groups = self._param_groups(trainer, pl_module, optimizer, "parameter")
        if self._halted:
            # halted, but the loop goes on (min_steps/min_epochs not met): no update lands after the fault
            self._loss_bad = None
            self._drop_update(groups)
            trainer.should_stop = True
            return
        grads, positions = groups.present_grads()
        if not grads:
            return
        device = grads[0].device
        loss_bad = (
            self._loss_bad.to(device)
            if self._loss_bad is not None
            else torch.zeros((), dtype=torch.bool, device=device)
        )
        self._loss_bad = None
        if grad_scaler(trainer) is None:
            self._check_step(trainer, pl_module, optimizer, groups, grads, positions, loss_bad)
        else:
            self._track_amp_step(trainer, optimizer, groups, grads, loss_bad)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._halt_pending is None:
            return
        reason, self._halt_pending = self._halt_pending, None
        # the fault episode ends with this run: a run resumed from the checkpoint alerts again if it comes back
        self._clear_condition(AlertKind.NON_FINITE, "")
        self._clear_condition(AlertKind.LOSS_SCALE_COLLAPSE, "")
        path = self._save_last_good(trainer)
        where = (
            f" The last good state is saved at '{path}'; after fixing the cause, resume with "
            f"trainer.fit(model, ckpt_path={path!r})."
            if path
            else " No checkpoint was saved (no checkpoint directory is known, or save_checkpoint_on_halt=False)."
        )
        if trainer.is_global_zero:
            log.warning("NaNGuard stopped training at step %d: %s.%s", trainer.global_step, reason, where)

    # -- 32 / bf16: one reduced flag and one sync per step ---------------------------------------------------
    def _check_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        groups: ParamGroups,
        grads: list[Tensor],
        positions: list[int],
        loss_bad: Tensor,
    ) -> None:
        check_params = self._check_params_now(trainer)
        params = [local_tensor(p.detach()) for p in groups.params] if check_params else []
        # a read-only 2-norm screen: False proves finiteness; True is confirmed exactly below (rare)
        flags = [loss_bad, may_be_non_finite(grads)]
        if check_params:
            flags.append(may_be_non_finite(params))
        # one collective (max over ranks: a NaN loss on one rank is every rank's fault) and one host sync
        values = all_reduce_max(torch.stack(flags).to(torch.float32)).tolist()
        loss_is_bad, grads_are_bad = values[0] > 0, values[1] > 0
        params_are_bad = check_params and values[2] > 0
        if grads_are_bad or params_are_bad:
            # slow path, taken by every rank together (the flags are reduced): the exact check, to tell NaN/Inf
            # from a 2-norm that overflowed on huge but finite values
            exact = [any_non_finite(grads), any_non_finite(params)]
            grads_are_bad, params_are_bad = (v > 0 for v in all_reduce_max(torch.stack(exact).float()).tolist())
        if not (loss_is_bad or grads_are_bad or params_are_bad):
            self._clear_condition(AlertKind.NON_FINITE, "")
            self._after_clean_step(pl_module, groups, optimizer)
            if self._should_log(trainer, self.log_every_n_steps):
                self._log_counters(trainer)
            return
        self.fault_steps += 1
        what = self._describe(pl_module, groups, grads, positions, loss_is_bad, grads_are_bad, params_are_bad)
        self._drop_update(groups)
        if params_are_bad and self.action != "rollback":
            action = "halt"  # weights already non-finite: skipping cannot repair them
        else:
            action = self.action
        if action == "rollback":
            action = self._rollback(pl_module, groups, optimizer)
        elif what.buffers:
            what = what.with_note(
                "the module's buffers were updated by this batch's forward pass and stay non-finite (only "
                "action='rollback' restores them)"
            )
        step = trainer.global_step
        done = {
            "halt": "the update was dropped and training stops",
            "skip": "the update was dropped",
            "rollback": f"weights and optimizer state were rolled back to the snapshot (rollback {self.rollbacks})",
        }[action]
        self._alert_non_finite(
            trainer,
            name=what.first_layer,
            value=float(what.count),
            message=(
                f"Non-finite values at step {step}: {what.text}; {done}. Usual remedies: lower the learning "
                "rate, check the data for NaN/Inf, clip gradients, use bf16 or a GradScaler for fp16."
            ),
        )
        if action == "halt":
            self._halt(trainer, f"non-finite values ({what.text})")
        self._log_counters(trainer)

    def _check_params_now(self, trainer: pl.Trainer) -> bool:
        n = self.check_params_every_n_steps
        return n is not None and (logger_step(trainer) + 1) % n == 0

    def _after_clean_step(
        self, pl_module: pl.LightningModule, groups: ParamGroups, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.action != "rollback":
            return
        # a snapshot of the state *before* this clean step's update, every snapshot_every_n_steps clean steps
        if self._snapshot is None or self._clean_steps_since_snapshot >= self.snapshot_every_n_steps:
            self._snapshot = _Snapshot.take(pl_module, groups.params, optimizer, reuse=self._snapshot)
            self._rollbacks_to_snapshot = 0
            self._clean_steps_since_snapshot = 0
        self._clean_steps_since_snapshot += 1

    def _rollback(self, pl_module: pl.LightningModule, groups: ParamGroups, optimizer: torch.optim.Optimizer) -> str:
        if self._snapshot is None or self._rollbacks_to_snapshot >= self.max_rollbacks:
            return "halt"
        self._snapshot.restore(pl_module, groups.params, optimizer)
        self._rollbacks_to_snapshot += 1
        # the next snapshot needs snapshot_every_n_steps clean steps *after* this rollback: a fault that keeps
        # coming back sooner than that exhausts max_rollbacks and halts
        self._clean_steps_since_snapshot = 0
        self.rollbacks += 1
        return "rollback"

    # -- fp16: count on device, read at a cadence --------------------------------------------------------------
    def _track_amp_step(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        groups: ParamGroups,
        grads: list[Tensor],
        loss_bad: Tensor,
    ) -> None:
        scaler = grad_scaler(trainer)
        assert scaler is not None and scaler._scale is not None
        device = grads[0].device
        amp = self._amp
        if not amp:
            zero = torch.zeros((), device=device)
            amp.update(
                overflows=zero.clone(), consecutive=zero.clone(), max_consecutive=zero.clone(), loss_faults=zero.clone()
            )
        found_inf = scaler_found_inf(trainer, optimizer)  # the scaler's own flag: no extra work
        if found_inf is not None:
            overflow = (found_inf > 0).to(device, torch.float32)
        else:
            # fused optimizers look for inf inside scaler.step, after this hook. The scaler backs the scale off
            # (factor < 1) exactly when a step overflowed, so a lower scale than at the last hook means the
            # previous step overflowed: exact, free, one step late.
            scale = scaler._scale.detach().reshape(()).to(device, torch.float32)
            previous = amp.get("previous_scale")
            overflow = (scale < previous).float() if previous is not None else torch.zeros((), device=device)
            amp["previous_scale"] = scale.clone()
        amp["overflows"] += overflow
        amp["consecutive"] = (amp["consecutive"] + 1) * overflow
        amp["max_consecutive"] = torch.maximum(amp["max_consecutive"], amp["consecutive"])
        amp["loss_faults"] += loss_bad.to(device, torch.float32)
        log_now = self._should_log(trainer, self.log_every_n_steps)
        if not (log_now or (logger_step(trainer) + 1) % self.amp_check_every_n_steps == 0):
            return

        flags = [amp["loss_faults"], amp["max_consecutive"]]
        check_params = self._check_params_now(trainer)
        if check_params:
            flags.append(any_non_finite([local_tensor(p.detach()) for p in groups.params]).to(torch.float32))
        reduced = all_reduce_max(torch.stack([f.to(device) for f in flags]))  # at the check cadence only
        values, (scale,), (overflows,), (consecutive,) = host_values(
            reduced, scaler._scale, amp["overflows"], amp["consecutive"]
        )
        amp["overflows"].zero_()
        amp["loss_faults"].zero_()
        amp["max_consecutive"].copy_(amp["consecutive"])
        self.overflow_steps += int(overflows)
        loss_faults, max_consecutive = values[0], values[1]
        params_bad = check_params and values[2] > 0
        step = trainer.global_step
        if log_now:
            self._log_counters(
                trainer, {"gradwatch/amp/loss_scale": scale, "gradwatch/amp/consecutive_overflows": consecutive}
            )

        collapsed = scale < self.min_loss_scale or max_consecutive >= self.max_consecutive_overflows
        if collapsed:
            reason = (
                f"the loss scale fell to {scale:.3g}, below the floor {self.min_loss_scale:g}"
                if scale < self.min_loss_scale
                else f"{int(max_consecutive)} consecutive steps overflowed and were skipped"
            )
            self._set_condition(
                trainer,
                AlertKind.LOSS_SCALE_COLLAPSE,
                "",
                True,
                lambda: Alert(
                    step=step,
                    kind=AlertKind.LOSS_SCALE_COLLAPSE,
                    name="",
                    value=scale if scale < self.min_loss_scale else max_consecutive,
                    threshold=self.min_loss_scale if scale < self.min_loss_scale else self.max_consecutive_overflows,
                    message=(
                        f"Loss-scale collapse at step {step}: {reason}; fp16 training is broken (every update is "
                        "being skipped) and training stops. Usual remedies: bf16 instead of fp16, a lower learning "
                        "rate, look for a loss or activation that overflows fp16 (e.g. missing normalisation)."
                    ),
                ),
            )
            self._halt(trainer, f"loss-scale collapse ({reason})")
        if loss_faults > 0 or params_bad:
            self.fault_steps += int(loss_faults) + int(params_bad)
            what = (
                "the weights are non-finite" if params_bad else f"the loss was non-finite on {int(loss_faults)} step(s)"
            )
            acts = self.action == "halt" or params_bad
            self._alert_non_finite(
                trainer,
                name="loss" if not params_bad else "",
                value=float(loss_faults),
                message=(
                    f"Non-finite values under fp16 by step {step}: {what} since the last check; the GradScaler "
                    f"skipped those updates{', and training stops' if acts else ''}. Usual remedies: check the "
                    "data for NaN/Inf, lower the learning rate, bf16 instead of fp16."
                ),
            )
            if acts:
                self._halt(trainer, what)
        elif not collapsed:
            self._clear_condition(AlertKind.NON_FINITE, "")
            self._clear_condition(AlertKind.LOSS_SCALE_COLLAPSE, "")

    # -- shared ------------------------------------------------------------------------------------------------
    def _alert_non_finite(self, trainer: pl.Trainer, name: str, value: float, message: str) -> None:
        """A ``non_finite`` alert, once per fault episode (consecutive faulty steps or checks)."""
        step = trainer.global_step
        self._set_condition(
            trainer,
            AlertKind.NON_FINITE,
            "",
            True,
            lambda: Alert(step=step, kind=AlertKind.NON_FINITE, name=name, value=value, threshold=0.0, message=message),
        )

    @staticmethod
    def _drop_update(groups: ParamGroups) -> None:
        # torch optimizers skip parameters whose grad is None: no update, no change to momentum/Adam state
        for p in groups.params:
            p.grad = None

    def _halt(self, trainer: pl.Trainer, reason: str) -> None:
        trainer.should_stop = True  # the decision is already the same on every rank
        self._halted = True
        self._halt_pending = reason

    def _save_last_good(self, trainer: pl.Trainer) -> str | None:
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        if not self.save_checkpoint_on_halt or dirpath is None:
            return None
        path = os.path.join(dirpath, f"gradwatch-halt-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)  # a collective under DDP: every rank halts at the same step
        self.halt_checkpoint = path
        return path

    def _describe(
        self,
        pl_module: pl.LightningModule,
        groups: ParamGroups,
        grads: list[Tensor],
        positions: list[int],
        loss_bad: bool,
        grads_bad: bool,
        params_bad: bool,
    ) -> _Description:
        """Name what went non-finite (this slow path may sync freely: it runs only on a fault)."""
        parts, first_layer, count = [], "", 0
        if loss_bad:
            parts.append("the loss")
            first_layer, count = "loss", 1
        for label, bad, tensors, where in (
            ("gradients", grads_bad, grads, positions),
            ("weights", params_bad, [local_tensor(p.detach()) for p in groups.params], list(range(len(groups.params)))),
        ):
            if not bad:
                continue
            mask = non_finite_mask(tensors).tolist()
            names = [groups.names[i] for i, m in zip(where, mask, strict=True) if m]
            if not names:  # non-finite on another rank only (sharded): the flag came from the reduction
                parts.append(f"the {label} (on another rank)")
                continue
            parts.append(f"the {label} of {_some(names)}; first offending layer '{layer_of(names[0])}'")
            first_layer = first_layer or layer_of(names[0])
            count += len(names)
        # running statistics (BatchNorm...) are updated by the forward pass, before any hook can stop the batch
        buffers = [(clean_name(n), b) for n, b in pl_module.named_buffers() if b.is_floating_point() and b.numel()]
        bad_buffers = []
        if buffers:
            mask = non_finite_mask([local_tensor(b.detach()) for _, b in buffers]).tolist()
            bad_buffers = [n for (n, _), m in zip(buffers, mask, strict=True) if m]
        if bad_buffers:
            parts.append(f"the buffers {_some(bad_buffers, 'buffer')}")
            first_layer = first_layer or layer_of(bad_buffers[0])
        return _Description(", ".join(parts), first_layer, count, buffers=bool(bad_buffers))

    def _log_counters(self, trainer: pl.Trainer, extra: dict[str, float] | None = None) -> None:
        metrics = {
            "gradwatch/guard/faults": float(self.fault_steps),
            "gradwatch/guard/rollbacks": float(self.rollbacks),
        }
        if grad_scaler(trainer) is not None:
            metrics["gradwatch/amp/overflow_steps"] = float(self.overflow_steps)
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

    # -- state ---------------------------------------------------------------------------------------------------
    @override
    def _extra_state(self) -> dict[str, Any]:
        return {
            "fault_steps": self.fault_steps,
            "rollbacks": self.rollbacks,
            "overflow_steps": self.overflow_steps,
            "halt_checkpoint": self.halt_checkpoint,
        }

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.fault_steps = int(state.get("fault_steps", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.overflow_steps = int(state.get("overflow_steps", 0))
        self.halt_checkpoint = state.get("halt_checkpoint")


@dataclass(frozen=True)
class _Description:
    text: str  # what went non-finite, for the message
    first_layer: str  # "loss", or the first offending layer in model order
    count: int  # how many things (the loss, parameters) went non-finite
    buffers: bool = False  # some of the module's buffers went non-finite

    def with_note(self, note: str) -> _Description:
        return _Description(f"{self.text} ({note})", self.first_layer, self.count, self.buffers)


def _some(names: list[str], noun: str = "parameter") -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{len(names)} {noun}(s) ({shown})"


@dataclass
class _Snapshot:
    """Known-good weights, buffers and optimizer state, copied on device; restored bit for bit.

    Only the optimizer's per-parameter *state* (momentum, Adam moments, step counts) is kept: its hyperparameters
    (the learning rate an LR scheduler sets, ...) are left as they are, so the schedule goes on after a rollback.
    Later snapshots copy into the same tensors (``foreach``), so memory stays at one copy.
    """

    weights: list[Tensor]
    buffers: list[Tensor]
    states: list[dict[str, Any] | None]  # per parameter, in ``params`` order; None: no state yet

    @classmethod
    def take(
        cls,
        module: torch.nn.Module,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        reuse: _Snapshot | None = None,
    ) -> _Snapshot:
        dst: list[Tensor] = []
        src: list[Tensor] = []
        weights = _copies([p.detach() for p in params], reuse.weights if reuse else None, dst, src)
        buffers = _copies([b.detach() for b in module.buffers()], reuse.buffers if reuse else None, dst, src)
        states: list[dict[str, Any] | None] = []
        for i, p in enumerate(params):
            state = optimizer.state.get(p)
            old = reuse.states[i] if reuse and len(reuse.states) == len(params) else None
            states.append(None if not state else _copy_state(state, old, dst, src))
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
        return cls(weights, buffers, states)

    def restore(
        self, module: torch.nn.Module, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> None:
        dst: list[Tensor] = [p.detach() for p in params] + [b.detach() for b in module.buffers()]
        src: list[Tensor] = [*self.weights, *self.buffers]
        if len(dst) != len(src):
            raise RuntimeError("NaNGuard: the model's parameters or buffers changed since the rollback snapshot.")
        for p, saved in zip(params, self.states, strict=True):
            if saved is None:
                optimizer.state.pop(p, None)
            else:
                optimizer.state[p] = _copy_state(saved, optimizer.state.get(p), dst, src)
        with torch.no_grad():
            torch._foreach_copy_(dst, src)


def _copies(tensors: list[Tensor], old: list[Tensor] | None, dst: list[Tensor], src: list[Tensor]) -> list[Tensor]:
    """Buffers for copies of ``tensors``: ``old``'s where they fit, queued on ``dst``/``src`` for one foreach copy."""
    out = []
    for i, t in enumerate(tensors):
        o = old[i] if old is not None and len(old) == len(tensors) else None
        if o is not None and _fits(o, t):
            dst.append(o)
            src.append(t)
            out.append(o)
        else:
            out.append(t.clone())
    return out


def _copy_state(
    state: dict[str, Any],
    old: dict[str, Any] | None,
    dst: list[Tensor],
    src: list[Tensor],
) -> dict[str, Any]:
    """A copy of one parameter's optimizer state, reusing ``old``'s tensors where they fit (queued copies)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            o = old.get(key) if old else None
            if isinstance(o, Tensor) and _fits(o, value):
                dst.append(o)
                src.append(value.detach())
                out[key] = o
            else:
                out[key] = value.detach().clone()
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
