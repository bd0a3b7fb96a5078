"""The one-line set-up: every gradwatch callback with coordinated defaults, in the right order."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_gradwatch._base import GradwatchCallback, find_state
from lightning_gradwatch._types import PositiveInt
from lightning_gradwatch._validation import check_bool, check_choice, check_number
from lightning_gradwatch.adaptive_clipping import CLIP_MODES, AdaptiveClipping, ClipMode
from lightning_gradwatch.alerts import Alert
from lightning_gradwatch.dead_neurons import DeadNeuronCallback
from lightning_gradwatch.gradient_norm import GradientNormLogger
from lightning_gradwatch.health_report import HealthReport
from lightning_gradwatch.loss_spike_guard import SPIKE_ACTIONS, LossSpikeGuard, SpikeAction
from lightning_gradwatch.nan_guard import NAN_ACTIONS, NanAction, NaNGuard
from lightning_gradwatch.saturation import SaturationCallback


def default_callbacks(
    nan_action: NanAction = "halt",
    clipping: ClipMode | None = "zscore",
    activations: bool = True,
    report: bool = True,
    log_every_n_steps: PositiveInt | None = None,
    spikes: SpikeAction | None = "log",
) -> list[GradwatchCallback]:
    """Every gradwatch callback with coordinated defaults, in hook order: the guard sees each step first, the
    norms are logged before any clipping, clipping comes last, and the report closes the run.

    Args:
        nan_action: what :class:`NaNGuard` does on a fault: ``"halt"``, ``"skip"`` or ``"rollback"``.
        clipping: the :class:`AdaptiveClipping` mode, or ``None`` for no clipping.
        activations: include :class:`DeadNeuronCallback` and :class:`SaturationCallback`.
        report: include :class:`HealthReport`.
        log_every_n_steps: logging cadence of every callback; ``None`` follows the Trainer.
        spikes: the :class:`LossSpikeGuard` action (``"log"``, ``"skip"``, ``"rollback"``), or ``None`` for none.

    Example::

        trainer = Trainer(callbacks=default_callbacks(nan_action="rollback"))
    """
    check_choice("nan_action", nan_action, NAN_ACTIONS)
    check_choice("clipping", clipping, CLIP_MODES, optional=True)
    activations = check_bool("activations", activations)
    report = check_bool("report", report)
    check_choice("spikes", spikes, SPIKE_ACTIONS, optional=True)
    log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, ge=1, integer=True, optional=True)
    callbacks: list[GradwatchCallback] = [
        NaNGuard(action=nan_action, log_every_n_steps=log_every_n_steps),
        GradientNormLogger(log_every_n_steps=log_every_n_steps),
    ]
    if spikes is not None:
        callbacks.append(LossSpikeGuard(action=spikes, log_every_n_steps=log_every_n_steps))
    if activations:
        callbacks += [
            DeadNeuronCallback(log_every_n_steps=log_every_n_steps),
            SaturationCallback(log_every_n_steps=log_every_n_steps),
        ]
    if clipping is not None:
        callbacks.append(AdaptiveClipping(mode=clipping, log_every_n_steps=log_every_n_steps))
    if report:
        callbacks.append(HealthReport())
    return sorted(callbacks, key=lambda cb: cb.hook_order)


class GradWatch(Callback):
    r"""All of gradwatch as one callback: :func:`default_callbacks` bundled, for one line in Python or in a
    LightningCLI YAML.

    The bundle forwards every Lightning hook to its callbacks, saves their states in its own checkpoint entry,
    and exposes their alerts together in :attr:`alerts`. The callbacks themselves are in
    :attr:`gradwatch_callbacks`.

    Args:
        nan_action: what :class:`NaNGuard` does on a fault: ``"halt"``, ``"skip"`` or ``"rollback"``.
        clipping: the :class:`AdaptiveClipping` mode, or ``None`` for no clipping.
        activations: include :class:`DeadNeuronCallback` and :class:`SaturationCallback`.
        report: include :class:`HealthReport`.
        log_every_n_steps: logging cadence of every callback; ``None`` follows the Trainer.
        spikes: the :class:`LossSpikeGuard` action (``"log"``, ``"skip"``, ``"rollback"``), or ``None`` for none.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradWatch

        trainer = Trainer(callbacks=[GradWatch()])

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: lightning_gradwatch.GradWatch
              init_args:
                nan_action: rollback
    """

    def __init__(
        self,
        nan_action: NanAction = "halt",
        clipping: ClipMode | None = "zscore",
        activations: bool = True,
        report: bool = True,
        log_every_n_steps: PositiveInt | None = None,
        spikes: SpikeAction | None = "log",
    ) -> None:
        self.gradwatch_callbacks = default_callbacks(
            nan_action, clipping, activations, report, log_every_n_steps, spikes
        )
        for callback in self.gradwatch_callbacks:
            callback._bundled = True  # their state is saved and restored here, under the bundle's key

    @property
    def alerts(self) -> list[Alert]:
        """Every callback's alerts, in step order."""
        return sorted((a for cb in self.gradwatch_callbacks for a in cb.alerts), key=lambda a: a.step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self.gradwatch_callbacks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for cb in self.gradwatch_callbacks:
            state = find_state(cb, state_dict)  # its own key, or its class's saved with other arguments
            if state is not None:
                cb.load_state_dict(state)

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states:  # saved by separate gradwatch callbacks: restore each from its own entry
            self.load_state_dict(states)


def _forward(hook: str) -> Any:
    def forward(self: GradWatch, *args: Any, **kwargs: Any) -> None:
        if not isinstance(self, GradWatch):  # Lightning called the hook on the class: callbacks=[GradWatch]
            raise TypeError(
                "callbacks=[GradWatch] passes the class itself; pass an instance: Trainer(callbacks=[GradWatch()])."
            )
        for callback in self.gradwatch_callbacks:
            getattr(callback, hook)(*args, **kwargs)

    forward.__name__ = hook
    forward.__doc__ = f"Forwards ``{hook}`` to every bundled callback."
    return forward


for _hook in [n for n in dir(Callback) if n.startswith("on_") and n != "on_load_checkpoint"] + ["setup", "teardown"]:
    setattr(GradWatch, _hook, _forward(_hook))
