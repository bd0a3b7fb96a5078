"""The base class of every gradwatch callback: alerts, logging, layout, checkpointed state, and the step dispatcher.

On ``on_before_optimizer_step`` the first gradwatch callback of the Trainer builds the step's shared
:class:`~lightning_gradwatch._step.StepGradients` and runs every gradwatch callback's step work in ``hook_order``:
the guard sees the step first, norms are logged before any clipping, clipping comes last, whatever order the user
listed them in. Subclasses put that work in :meth:`GradwatchCallback._before_optimizer_step`; overriding
``on_before_optimizer_step`` itself is refused (it would silently switch off every other callback's step work).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from enum import IntEnum
from typing import Any, ClassVar, final

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_gradwatch._distributed import is_sharded
from lightning_gradwatch._layout import merge_layouts, ordered_layout
from lightning_gradwatch._loss_trace import loss_trace
from lightning_gradwatch._params import OptimizerParams
from lightning_gradwatch._reporting import flush_metrics, logger_step, print_line, queue_metrics, tensorboard_writers
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch.alerts import Alert

_LAYOUT_WRITTEN_ATTR = "_lightning_gradwatch_layout_written"
#: A condition re-alerts only after it has been clear for this many optimizer steps.
REARM_STEPS = 100
_BUNDLE_KEY = "GradWatch"


class HookOrder(IntEnum):
    """Where a callback's work on a step's gradients runs among the gradwatch callbacks, by role: the guards first
    (an update they drop is never measured, folded or clipped), then what reads the unclipped gradients, then the
    clipping that changes them, and the report last. Ties keep the Trainer's callback order."""

    NAN_GUARD = 0  # screens the step; may drop the update
    SETUP_CHECK = 1  # host facts only (which .grad exists)
    LOSS_SPIKE_GUARD = 5  # may drop the update on a spiking loss
    GRADIENT_NORMS = 10  # the norms before any clipping
    NOISE_SCALE = 12  # the step's gradients, before any clipping
    ACTIVATIONS = 20  # the forward pass's statistics
    CLIPPING = 30  # changes the gradients: after everything that reads them
    OTHERS = 50  # a callback that does not say: after the clipping
    REPORT = 100  # closes the run


def gradwatch_callbacks(trainer: pl.Trainer) -> list[GradwatchCallback]:
    """The Trainer's gradwatch callbacks in list order, with those inside a bundle (``GradWatch``) expanded."""
    found: list[GradwatchCallback] = []
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set in Trainer.__init__, undeclared
        if isinstance(callback, GradwatchCallback):
            found.append(callback)
        elif isinstance(getattr(callback, "gradwatch_callbacks", None), list):
            found.extend(callback.gradwatch_callbacks)
    return found


class GradwatchCallback(Callback):
    """Base class of the gradwatch callbacks.

    A subclass puts its work on each step's final gradients in :meth:`_before_optimizer_step`, reports with
    :meth:`_set_condition` / :meth:`_emit_alert` and :meth:`_log_metrics` (on steps where :meth:`_should_log`),
    describes its TensorBoard charts in :meth:`_tensorboard_layout`, and its checkpointed state in
    :meth:`_config`, :meth:`_extra_state` and :meth:`_load_extra_state`. Hooks it overrides call ``super()``.
    """

    #: Position among gradwatch callbacks on ``on_before_optimizer_step`` (:class:`HookOrder`): lower runs first.
    hook_order: ClassVar[int] = HookOrder.OTHERS
    #: Two instances in one Trainer would act twice (clip twice, guard twice, write one report over the other).
    single_instance: ClassVar[bool] = False
    #: The callback makes the shared host read on every step under 32-bit and bf16 (NaNGuard): others may ride on it.
    reads_every_step: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "on_before_optimizer_step" in vars(cls):
            raise TypeError(
                f"{cls.__name__} overrides on_before_optimizer_step, which runs every gradwatch callback's step work "
                "in order; overriding it would switch that off. Put the step's work in "
                "_before_optimizer_step(self, trainer, pl_module, optimizer, step) instead."
            )

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self._active_conditions: set[tuple[str, str]] = set()
        self._clear_since: dict[tuple[str, str], int] = {}  # an active condition seen clear since this step
        self._episodes: dict[tuple[str, str], int] = {}  # an active condition's alert, its index in ``alerts``
        self._bundled = False  # set by GradWatch: the bundle saves and restores this callback's state
        self._optimizer_params: dict[int, OptimizerParams] = {}  # the dispatcher's, per fit
        self._last_step: dict[int, int] = {}  # optimizer id -> the global step last dispatched

    # -- alerts ----------------------------------------------------------------------------------------------
    def _emit_alert(self, trainer: pl.Trainer, alert: Alert) -> None:
        """Record ``alert``; on rank zero print it once (a warning; info goes to the log at INFO) and write it to
        TensorBoard as text."""
        self.alerts.append(alert)
        if not trainer.is_global_zero:
            return
        level = logging.WARNING if alert.severity == "warning" else logging.INFO
        print_line(f"[gradwatch {alert.kind}] step {alert.step}: {alert.message}", level)
        for writer in tensorboard_writers(trainer):
            text = (
                f"**{alert.kind}** ({alert.severity}) `{alert.name or '(model)'}` value={alert.value:.4g} "
                f"threshold={alert.threshold:.4g}  \n{alert.message}"
            )
            writer.add_text(f"gradwatch/alerts/{alert.kind}", text, global_step=alert.step)

    def _set_condition(
        self, trainer: pl.Trainer, kind: str, key: str, firing: bool, make_alert: Callable[[], Alert]
    ) -> None:
        """Alert when the condition ``(kind, key)`` starts; stay silent while it persists. It re-arms once it has
        been clear for :data:`REARM_STEPS` steps: one that comes back sooner (a layer with one stray non-zero
        step, a fraction hovering at its threshold) is the same episode, counted on its alert."""
        condition, now = (kind, key), trainer.global_step
        if not firing:
            self._clear_condition(kind, key, now)
            return
        cleared = self._clear_since.pop(condition, None)
        if condition in self._active_conditions and cleared is not None and now - cleared >= REARM_STEPS:
            self._active_conditions.discard(condition)  # clear long enough: a new episode
        if condition not in self._active_conditions:
            self._active_conditions.add(condition)
            self._emit_alert(trainer, make_alert())
            self._episodes[condition] = len(self.alerts) - 1
        elif cleared is not None:  # back within the episode: one more occurrence of its alert
            index = self._episodes.get(condition)
            if index is not None and index < len(self.alerts):
                alert = self.alerts[index]
                self.alerts[index] = replace(alert, count=alert.count + 1, last_step=now)

    def _clear_condition(self, kind: str, key: str, step: int | None = None) -> None:
        """The condition ``(kind, key)`` no longer holds. Without ``step`` the episode is over at once (the guard's
        fault episode ends with a clean step); at ``step`` it ends only after :data:`REARM_STEPS` clear steps."""
        condition = (kind, key)
        if step is None:
            self._active_conditions.discard(condition)
            self._clear_since.pop(condition, None)
        elif condition in self._active_conditions:
            self._clear_since.setdefault(condition, step)

    # -- logging ---------------------------------------------------------------------------------------------
    @staticmethod
    def _should_log(trainer: pl.Trainer, every_n_steps: int | None) -> bool:
        """Whether the step about to be taken is a logging step: the Trainer's cadence, or ``every_n_steps``."""
        if every_n_steps is None:
            return bool(trainer._logger_connector.should_update_logs)
        return (logger_step(trainer) + 1) % every_n_steps == 0

    @staticmethod
    def _logs_next_step(trainer: pl.Trainer, every_n_steps: int | None) -> bool:
        """Whether the step after the one about to be taken is a logging step (``trainer.should_stop`` aside)."""
        every = every_n_steps if every_n_steps is not None else trainer.log_every_n_steps  # type: ignore[attr-defined]
        return every > 0 and (logger_step(trainer) + 2) % every == 0

    @staticmethod
    def _log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Queue host-side metrics for this step; every gradwatch metric of a step goes to the loggers in one call."""
        queue_metrics(trainer, metrics)

    def _flush(self, trainer: pl.Trainer) -> None:
        """Write the layout (once per run, now that the model's activations have been seen) and the step's row."""
        if not trainer.is_global_zero:
            return
        if trainer.lightning_module is not None:
            self._write_layout_once(trainer, trainer.lightning_module)
        flush_metrics(trainer)

    # -- TensorBoard layout ----------------------------------------------------------------------------------
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        """This callback's custom-scalars charts: ``{category: {chart: ["Multiline", [tag regex, ...]]}}``; leave
        out charts that cannot hold data for this model."""
        return {}

    @staticmethod
    def _write_layout_once(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = [w for w in tensorboard_writers(trainer) if not getattr(w, _LAYOUT_WRITTEN_ATTR, False)]
        if not writers:
            return
        peers = gradwatch_callbacks(trainer)
        layout = ordered_layout(merge_layouts(cb._tensorboard_layout(trainer, pl_module) for cb in peers))
        for writer in writers:
            if layout:
                writer.add_custom_scalars(layout)
            setattr(writer, _LAYOUT_WRITTEN_ATTR, True)

    def _report_pictures(self, trainer: pl.Trainer, directory: str) -> list[tuple[str, str]]:
        """Pictures this callback draws for the health report, saved into ``directory``: ``(title, file name)``."""
        return []

    def _report_lines(self, trainer: pl.Trainer) -> list[str]:
        """Measurements this callback adds to the health report, one Markdown line each (not findings)."""
        return []

    # -- the step dispatcher ---------------------------------------------------------------------------------
    def _before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
    ) -> None:
        """A subclass's work on the final gradients of a step (unscaled, accumulated, all-reduced), shared in
        ``step`` with every other gradwatch callback."""

    @final
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        peers = gradwatch_callbacks(trainer)
        if not peers or peers[0] is not self:
            return  # (reordering trainer.callbacks instead would mutate the list Lightning is iterating)
        key = id(optimizer)
        index = self._optimizer_params.get(key)
        if index is None or not index.matches(optimizer):
            # new, or its parameter groups changed (BaseFinetuning unfreezing a backbone): every callback indexes
            # the groups as they are now, and whatever was derived from the old index (layers, positions) goes with it
            index = self._optimizer_params[key] = OptimizerParams.of(pl_module, optimizer, sharded=is_sharded(trainer))
        # a closure optimizer (LBFGS) runs this hook once per closure evaluation: count the step once
        repeat = self._last_step.get(key) == trainer.global_step
        self._last_step[key] = trainer.global_step
        step = StepGradients.of(trainer, optimizer, index, repeat=repeat)
        for callback in sorted(peers, key=lambda cb: cb.hook_order):
            callback._before_optimizer_step(trainer, pl_module, optimizer, step)

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        peers = gradwatch_callbacks(trainer)
        if peers and peers[0] is self:
            _refuse_collisions(peers)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        peers = gradwatch_callbacks(trainer)
        if trainer.training and peers and peers[0] is self:  # the first gradwatch callback keeps the loss trace
            loss_trace(trainer).record(trainer, loss)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peers = gradwatch_callbacks(trainer)
        if peers and peers[0] is self:
            loss_trace(trainer).reset()
        self._optimizer_params.clear()  # a new fit may bring new optimizers
        self._last_step.clear()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        peers = gradwatch_callbacks(trainer)
        if peers and peers[-1] is self:  # the last gradwatch callback to see the step sends its one row
            self._flush(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush(trainer)

    # -- state -----------------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        """The arguments the checkpointed state depends on; saved with it and compared on resume."""
        return {}

    def _extra_state(self) -> dict[str, Any]:
        """The subclass's checkpointed state (besides alerts), as plain values and CPU tensors."""
        return {}

    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        """Restore the subclass's state; ``changed`` names the :meth:`_config` arguments that differ from the
        checkpoint's. Returns what could not be carried over (for the warning), empty if everything was."""
        return []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self._config(),
            "alerts": [a.to_dict() for a in self.alerts],
            "active_conditions": sorted(list(c) for c in self._active_conditions),
            **self._extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]
        self._active_conditions = {(str(k), str(n)) for k, n in state_dict.get("active_conditions", [])}
        saved = state_dict.get("config", {})
        current = self._config()
        changed = {k for k, v in current.items() if k in saved and saved[k] != v}
        dropped = self._load_extra_state(state_dict, changed)
        if dropped:
            arguments = ", ".join(f"{k}={saved[k]!r} -> {current[k]!r}" for k in sorted(changed))
            rank_zero_warn(
                f"{type(self).__name__} resumed with other arguments ({arguments}): {'; '.join(dropped)} could not "
                "be carried over and start afresh. Its alerts and counters were restored."
            )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores a callback only under its exact state key, which holds its arguments: a run resumed
        # with other arguments (as the halt message invites) would silently lose every alert and statistic
        if self._bundled:
            return  # the bundle restores its callbacks
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states:
            state = find_state(self, states)
            if state is not None:
                self.load_state_dict(state)


def _refuse_collisions(peers: list[GradwatchCallback]) -> None:
    """Raise when gradwatch callbacks of one class would act twice: a single-instance class (guard, clipping,
    report) listed twice, or any class both inside ``GradWatch()`` and beside it."""
    by_class: dict[type[GradwatchCallback], list[GradwatchCallback]] = {}
    for callback in peers:
        by_class.setdefault(type(callback), []).append(callback)
    collisions = []
    for cls, members in by_class.items():
        if len(members) > 1 and (cls.single_instance or any(m._bundled for m in members)):
            inside = sum(m._bundled for m in members)
            where = f"{inside} inside GradWatch() and {len(members) - inside} beside it" if inside else "separately"
            collisions.append(f"{cls.__name__} {len(members)} times ({where})")
    if collisions:
        raise ValueError(
            f"gradwatch callbacks collide: {'; '.join(collisions)}. Each would act on every step (clip twice, guard "
            "twice, report twice). Keep one of each: drop the separate callback, or build the list yourself with "
            "default_callbacks(...) and change the one you need."
        )


def find_state(callback: GradwatchCallback, states: Mapping[str, Any]) -> dict[str, Any] | None:
    """``callback``'s checkpointed state in ``states`` (a checkpoint's ``"callbacks"`` or a bundle's state): under
    its own key, else the one state of the same class saved with other arguments; a bundle's states are searched
    too. ``None`` if there is none, or several that could be it."""
    exact, similar = None, []
    prefix = type(callback).__qualname__
    for key, value in _flattened(states):
        if key == callback.state_key:
            exact = value
        elif key == prefix or key.startswith(prefix + "{"):
            similar.append(value)
    if exact is not None:
        return exact
    return similar[0] if len(similar) == 1 else None


def _flattened(states: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key, value in states.items():
        if not isinstance(key, str) or not isinstance(value, dict):
            continue
        if key == _BUNDLE_KEY:
            out.extend(_flattened(value))
        else:
            out.append((key, value))
    return out
