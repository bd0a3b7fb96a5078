"""The one-line set-up: every gradwatch callback with coordinated defaults, in the right order."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_gradwatch._core import GradwatchCallback, check_positive_int
from lightning_gradwatch.adaptive_clipping import AdaptiveClipping
from lightning_gradwatch.alerts import Alert
from lightning_gradwatch.dead_neurons import DeadNeuronCallback
from lightning_gradwatch.gradient_norm import GradientNormLogger
from lightning_gradwatch.health_report import HealthReport
from lightning_gradwatch.nan_guard import NaNGuard
from lightning_gradwatch.saturation import SaturationCallback

_ACTIONS = ("halt", "skip", "rollback")
_CLIP_MODES = ("zscore", "percentile", "agc")


def default_callbacks(
    nan_action: Literal["halt", "skip", "rollback"] = "halt",
    clipping: Literal["zscore", "percentile", "agc"] | None = "zscore",
    activations: bool = True,
    report: bool = True,
    log_every_n_steps: int | None = None,
) -> list[GradwatchCallback]:
    """Every gradwatch callback with coordinated defaults, in hook order: the guard sees each step first, the
    norms are logged before any clipping, clipping comes last, and the report closes the run.

    Args:
        nan_action: what :class:`NaNGuard` does on a fault: ``"halt"``, ``"skip"`` or ``"rollback"``.
        clipping: the :class:`AdaptiveClipping` mode, or ``None`` for no clipping.
        activations: include :class:`DeadNeuronCallback` and :class:`SaturationCallback`.
        report: include :class:`HealthReport`.
        log_every_n_steps: logging cadence of every callback; ``None`` follows the Trainer.

    Example::

        trainer = Trainer(callbacks=default_callbacks(nan_action="rollback"))
    """
    if nan_action not in _ACTIONS:
        raise ValueError(f"`nan_action` must be one of {', '.join(map(repr, _ACTIONS))}, got {nan_action!r}.")
    if clipping is not None and clipping not in _CLIP_MODES:
        raise ValueError(f"`clipping` must be one of {', '.join(map(repr, _CLIP_MODES))} or None, got {clipping!r}.")
    check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
    callbacks: list[GradwatchCallback] = [
        NaNGuard(action=nan_action, log_every_n_steps=log_every_n_steps),
        GradientNormLogger(log_every_n_steps=log_every_n_steps),
    ]
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
        nan_action: Literal["halt", "skip", "rollback"] = "halt",
        clipping: Literal["zscore", "percentile", "agc"] | None = "zscore",
        activations: bool = True,
        report: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.gradwatch_callbacks = default_callbacks(nan_action, clipping, activations, report, log_every_n_steps)

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
            if cb.state_key in state_dict:
                cb.load_state_dict(state_dict[cb.state_key])


def _forward(hook: str) -> Any:
    def forward(self: GradWatch, *args: Any, **kwargs: Any) -> None:
        for callback in self.gradwatch_callbacks:
            getattr(callback, hook)(*args, **kwargs)

    forward.__name__ = hook
    forward.__doc__ = f"Forwards ``{hook}`` to every bundled callback."
    return forward


for _hook in [name for name in dir(Callback) if name.startswith("on_")] + ["setup", "teardown"]:
    setattr(GradWatch, _hook, _forward(_hook))
