"""The one-line set-up: every gradwatch callback with coordinated defaults, in the right order."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_gradwatch._charts import DEFAULT_MAX_SERIES, check_patterns_syntax
from lightning_gradwatch._probe_batch import ForwardFn, check_forward_fn
from lightning_gradwatch._types import Null, PositiveInt
from lightning_gradwatch._validation import check_bool, check_choice, check_number
from lightning_gradwatch.activations.dead_neurons import DeadNeuronCallback
from lightning_gradwatch.activations.saturation import SaturationCallback
from lightning_gradwatch.alerts import Alert
from lightning_gradwatch.core.callback import GradwatchCallback, find_state
from lightning_gradwatch.diagnosis.health_report import HealthReport
from lightning_gradwatch.diagnosis.setup_check import SetupCheck
from lightning_gradwatch.gradients.adaptive_clipping import CLIP_MODES, AdaptiveClipping, ClipMode
from lightning_gradwatch.gradients.gradient_norm import GradientNormLogger
from lightning_gradwatch.guards.loss_spike_guard import SPIKE_ACTIONS, LossSpikeGuard, SpikeAction
from lightning_gradwatch.guards.nan_guard import NAN_ACTIONS, NanAction, NaNGuard


def default_callbacks(
    nan_action: NanAction = "halt",
    clipping: ClipMode | Null = "zscore",
    activations: bool = True,
    report: bool = True,
    log_every_n_steps: PositiveInt | Null = None,
    spikes: SpikeAction | Null = "log",
    layers: list[str] | None = None,
    max_series: PositiveInt | Null = DEFAULT_MAX_SERIES,
    forward_fn: ForwardFn | None = None,
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
        layers: ``fnmatch`` patterns of the layers the per-layer charts show (``"!pattern"`` leaves some out);
            ``None``: all. Every layer is still judged.
        max_series: at most this many per-layer gradient series per metric; past it they are charted per block.
        forward_fn: under ``torch.compile`` only: ``forward_fn(module, batch)`` runs the model on a training batch
            for the eager passes of :class:`SetupCheck` and the activation callbacks; default ``module(batch[0])``.

    Example::

        trainer = Trainer(callbacks=default_callbacks(nan_action="rollback"))
    """
    check_choice("nan_action", nan_action, NAN_ACTIONS)
    clipping = check_choice("clipping", clipping, CLIP_MODES, optional=True)
    activations = check_bool("activations", activations)
    report = check_bool("report", report)
    spikes = check_choice("spikes", spikes, SPIKE_ACTIONS, optional=True)
    log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, ge=1, integer=True, optional=True)
    layers = check_patterns_syntax(layers)
    forward_fn = check_forward_fn(forward_fn)
    callbacks: list[GradwatchCallback] = [
        NaNGuard(action=nan_action, log_every_n_steps=log_every_n_steps),
        SetupCheck(log_every_n_steps=log_every_n_steps, forward_fn=forward_fn),
        GradientNormLogger(log_every_n_steps=log_every_n_steps, layers=layers, max_series=max_series),
    ]
    if spikes is not None:
        callbacks.append(LossSpikeGuard(action=spikes, log_every_n_steps=log_every_n_steps))
    if activations:
        callbacks += [
            DeadNeuronCallback(log_every_n_steps=log_every_n_steps, layers=layers, forward_fn=forward_fn),
            SaturationCallback(log_every_n_steps=log_every_n_steps, layers=layers, forward_fn=forward_fn),
        ]
    if clipping is not None:
        callbacks.append(AdaptiveClipping(mode=clipping, log_every_n_steps=log_every_n_steps))
    if report:
        callbacks.append(HealthReport())
    return sorted(callbacks, key=lambda cb: cb.hook_order)


_CHECKPOINTING = ("state_dict", "load_state_dict", "on_load_checkpoint")
#: The Lightning hooks a bundled callback may implement; tests/test_preset.py keeps it in step with the callbacks.
BUNDLE_HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_end",
    "on_fit_end",
    "on_exception",
    "teardown",
)

_LIGHTNING_HOOKS = [n for n in dir(Callback) if n.startswith("on_")] + ["setup", "teardown"]


class _BundleType(type):
    """Keeps :class:`GradWatch`'s plumbing out of ``help()`` and ``dir(GradWatch)``: the hooks and the readable
    signature stay reachable by name (Lightning calls the hooks with ``getattr``)."""

    def __dir__(cls) -> list[str]:
        hidden = {*_LIGHTNING_HOOKS, *_CHECKPOINTING, "__signature__", "__annotations__"}
        return [name for name in super().__dir__() if name not in hidden]


class _Bundle(Callback, metaclass=_BundleType):
    """The plumbing of :class:`GradWatch`: each Lightning hook passed on, in order, to the bundled callbacks that
    implement it (a hook none of them implements is not a call per step)."""

    gradwatch_callbacks: list[GradwatchCallback]
    _implementers: tuple[tuple[int, ...], dict[str, list[Any]]] = ((), {})

    def _pass_on(self, hook: str, *args: Any) -> None:
        if not isinstance(self, _Bundle):  # Lightning called the hook on the class: callbacks=[GradWatch]
            raise TypeError(
                "callbacks=[GradWatch] passes the class itself; pass an instance: Trainer(callbacks=[GradWatch()])."
            )
        members, by_hook = self._implementers
        if members != tuple(map(id, self.gradwatch_callbacks)):  # first call, or the list was changed
            members = tuple(map(id, self.gradwatch_callbacks))
            by_hook = {
                h: [getattr(cb, h) for cb in self.gradwatch_callbacks if _implements(cb, h)] for h in BUNDLE_HOOKS
            }
            self._implementers = members, by_hook
        for bound in by_hook[hook]:
            bound(*args)

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _Bundle._pass_on(self, "setup", trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        _Bundle._pass_on(self, "on_fit_start", trainer, pl_module)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        _Bundle._pass_on(self, "on_train_start", trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        _Bundle._pass_on(self, "on_train_batch_start", trainer, pl_module, batch, batch_idx)

    @override
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        _Bundle._pass_on(self, "on_before_backward", trainer, pl_module, loss)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        _Bundle._pass_on(self, "on_before_optimizer_step", trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        _Bundle._pass_on(self, "on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        _Bundle._pass_on(self, "on_train_end", trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        _Bundle._pass_on(self, "on_fit_end", trainer, pl_module)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException | None = None) -> None:
        # the default: with callbacks=[GradWatch] Lightning calls this on the class, one argument short, after
        # the first hook raised _pass_on's TypeError; that error must reach the user, not a missing-argument one
        _Bundle._pass_on(self, "on_exception", trainer, pl_module, exception)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _Bundle._pass_on(self, "teardown", trainer, pl_module, stage)

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


def _implements(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)


class GradWatch(_Bundle):
    """Every gradwatch guard and monitor in one Lightning callback, with coordinated defaults.

    ``Trainer(callbacks=[GradWatch()])`` adds, in this order: NaNGuard (NaN/Inf in the loss, gradients, buffers or
    weights: halt, skip or roll back), SetupCheck (mistakes in the training code: a learning rate far too high,
    parameters that get no gradient or are in no optimizer), GradientNormLogger (global and per-layer gradient norms; vanishing,
    exploding and stopped layers), LossSpikeGuard, DeadNeuronCallback and SaturationCallback, AdaptiveClipping
    (clipping at a threshold learned from the run) and HealthReport (the diagnosis at the end of the run).

    Where the output goes:

    - the console: one line per finding as it happens, and the health report at the end of the run;
    - ``gradwatch_report.md`` and ``gradwatch_report.json``, the report, in the logger's version folder
      (e.g. ``lightning_logs/version_0/``);
    - every Lightning logger: the ``gradwatch/...`` metrics; in TensorBoard the Custom Scalars tab holds the
      charts, the Text tab one entry per finding (``gradwatch/alerts/<kind>/text_summary``);
    - ``GradWatch().alerts``: each finding as an ``Alert`` with its step, kind (e.g. ``"vanishing_gradient"``),
      layer, value, threshold, message (with the usual remedy) and severity (``"warning"`` or ``"info"``).

    Docs: README.md and docs/ in the repository and the source distribution (docs/alerts.md, docs/tensorboard.md,
    one page per callback). The bundled callbacks are in ``gradwatch_callbacks``; ``default_callbacks(...)``
    returns the same list, to change one of them.

    Args:
        nan_action: what to do on a NaN/Inf: halt (stop, saving a checkpoint of the last good state), skip (drop
            the step's update) or rollback (restore the last good snapshot).
        clipping: the clipping mode: zscore, percentile, agc, or null for no clipping.
        activations: watch for dead ReLU units and saturated sigmoid/tanh outputs.
        report: print the health report at the end of the run and save it as gradwatch_report.md and .json in
            the logger's version folder. Every finding is also printed when it happens and logged to TensorBoard
            (the charts in its Custom Scalars tab, the findings in Text); docs: README.md and docs/ in the
            repository.
        log_every_n_steps: how often every callback logs and judges; null follows the Trainer's
            log_every_n_steps.
        spikes: what to do on a loss spike: log, skip, rollback, or null to leave loss spikes unwatched.
        layers: which layers the per-layer charts show, as fnmatch patterns ("!pattern" leaves some out); null:
            all. Every layer is still judged and named in alerts.
        max_series: at most this many per-layer gradient series per metric; past it the layers are charted one
            series per repeated block (a transformer layer, a ResNet block), said once; null: every layer.
        forward_fn: under torch.compile: forward_fn(module, batch) runs the model for the eager checks; null: module(x).

    Raises:
        ValueError: an argument outside what is accepted, naming the argument.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradWatch

        trainer = Trainer(callbacks=[GradWatch(nan_action="rollback")])

    In a LightningCLI YAML (``null``, ``None`` and ``none`` all turn an option off)::

        trainer:
          callbacks:
            - class_path: lightning_gradwatch.GradWatch
              init_args:
                nan_action: rollback
                clipping: null
    """

    def __init__(
        self,
        nan_action: NanAction = "halt",
        clipping: ClipMode | Null = "zscore",
        activations: bool = True,
        report: bool = True,
        log_every_n_steps: PositiveInt | Null = None,
        spikes: SpikeAction | Null = "log",
        layers: list[str] | None = None,
        max_series: PositiveInt | Null = DEFAULT_MAX_SERIES,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        self.gradwatch_callbacks = default_callbacks(
            nan_action, clipping, activations, report, log_every_n_steps, spikes, layers, max_series, forward_fn
        )
        for callback in self.gradwatch_callbacks:
            callback._bundled = True  # their state is saved and restored here, under the bundle's key

    @property
    def alerts(self) -> list[Alert]:
        """Every finding of the bundled callbacks so far, in step order."""
        return sorted((a for cb in self.gradwatch_callbacks for a in cb.alerts), key=lambda a: a.step)


def _readable_signature(function: Any) -> inspect.Signature:
    """``function``'s signature with its hints as a reader needs them (``Literal['halt', 'skip', 'rollback']``,
    ``int | None``) rather than this module's aliases; jsonargparse reads the real hints from ``__init__``."""
    hints = typing.get_type_hints(function, {**globals(), "Null": type(None), "PositiveInt": int})
    signature = inspect.signature(function)
    parameters = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
    return signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty)


_init = _readable_signature(GradWatch.__init__)
GradWatch.__signature__ = _init.replace(parameters=list(_init.parameters.values())[1:])  # type: ignore[attr-defined]
