"""The base class of every gradwatch callback: alerts, logging, layout and checkpointed state.

On ``on_before_optimizer_step`` the Trainer's :class:`~lightning_gradwatch.core.session.Session` builds the step's
shared :class:`~lightning_gradwatch._step.StepGradients` once and runs every gradwatch callback's step work in
``hook_order``: the guard sees the step first, norms are logged before any clipping, clipping comes last, whatever
order the user listed them in. Subclasses put that work in :meth:`GradwatchCallback._before_optimizer_step`; overriding
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

from lightning_gradwatch._layout import merge_layouts, ordered_layout
from lightning_gradwatch._reporting import logger_step, logs_this_step, print_line, tensorboard_writers
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch.alerts import Alert, plain_strings
from lightning_gradwatch.core.session import session_of

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

    @property
    def stopped_this_fit(self) -> bool:
        """Whether this callback stopped the current fit (a guard's halt)."""
        return False

    @property
    def halt_step(self) -> int | None:
        """The step at which this callback stopped a run, if it did."""
        return None

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
        condition, now = (str(kind), key), trainer.global_step  # a plain string: it is checkpointed
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
        condition = (str(kind), key)
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
            return logs_this_step(trainer)
        return (logger_step(trainer) + 1) % every_n_steps == 0

    @staticmethod
    def _logs_next_step(trainer: pl.Trainer, every_n_steps: int | None) -> bool:
        """Whether the step after the one about to be taken is a logging step (``trainer.should_stop`` aside)."""
        every = every_n_steps if every_n_steps is not None else trainer.log_every_n_steps  # type: ignore[attr-defined]
        return every > 0 and (logger_step(trainer) + 2) % every == 0

    @staticmethod
    def _log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Queue host-side metrics for this step; every gradwatch metric of a step goes to the loggers in one call."""
        if trainer.is_global_zero:
            session_of(trainer).metrics.queue(trainer, metrics)

    def _flush(self, trainer: pl.Trainer) -> None:
        """Write the layout (once per run, now that the model's activations have been seen) and the step's row."""
        if not trainer.is_global_zero:
            return
        if trainer.lightning_module is not None:
            self._write_layout_once(trainer, trainer.lightning_module)
        session_of(trainer).metrics.flush(trainer)

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
        peers = session_of(trainer).members(trainer)
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

    # -- the step's work -------------------------------------------------------------------------------------
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
        session = session_of(trainer)
        if session.leads(trainer, self):  # the others' turn comes from the session, in hook order
            session.dispatch_step(trainer, pl_module, optimizer)

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        session = session_of(trainer)
        session.forget_members()  # model callbacks are attached by now
        if session.leads(trainer, self):
            _refuse_collisions(session.members(trainer))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        session = session_of(trainer)
        if trainer.training and session.leads(trainer, self):
            session.loss_trace.record(trainer, loss)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session = session_of(trainer)
        if session.leads(trainer, self):
            session.start_fit()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if session_of(trainer).closes(trainer, self):  # the last to see the step sends its one row
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
        state = {
            "config": self._config(),
            "alerts": [a.to_dict() for a in self.alerts],
            "active_conditions": sorted([str(kind), str(key)] for kind, key in self._active_conditions),
            **self._extra_state(),
        }
        return plain_strings(state)  # an AlertKind anywhere in it would make the checkpoint unloadable by default

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
