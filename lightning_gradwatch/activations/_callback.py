"""The cadence, verdicts and lifecycle shared by the activation callbacks (DeadNeuronCallback, SaturationCallback).

Every ``sample_every_n_steps`` optimizer steps the forward pass is watched (the shared probe of
:mod:`~lightning_gradwatch.activations._probe`), and each layer's statistic is folded into a sliding window of the
last ``window`` sampled batches, kept on the device. A verdict needs a full window (at the end of a shorter run, at
least three samples). It is reached without a sync of its own: the window's per-layer fractions ride on the step's
shared host read when NaNGuard makes one (every step under 32-bit and bf16), else they are read on the next logging
step. Metrics are logged on logging steps.

Severity: a layer past the threshold is worth knowing (``info``: a stable sparse layer, such as a squeeze-excitation
gate, trains fine); it is a warning when most of the layer is affected (``most``), or when the fraction grew by
``growth`` above the lowest it was (units that died during training) and the training loss did not improve since
then (under automatic optimization; see :mod:`~lightning_gradwatch._loss_trend`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_gradwatch._charts import charted, check_patterns_syntax
from lightning_gradwatch._distributed import is_sharded
from lightning_gradwatch._loss_trend import SampledLoss, improved, window_loss
from lightning_gradwatch._probe_batch import (
    BATCHNORM_WARMUP,
    CAN_RUN_EAGERLY,
    ForwardFn,
    check_forward_fn,
    run_eagerly,
    tracks_batch_statistics,
)
from lightning_gradwatch._reporting import host_values, logger_step
from lightning_gradwatch._validation import check_number
from lightning_gradwatch.activations._probe import (
    ActivationProbe,
    ActivationSubscriber,
    Layer,
    compiled_modules,
    probe_for,
)
from lightning_gradwatch.alerts import Alert, Severity, alert_message
from lightning_gradwatch.core.callback import GradwatchCallback, HookOrder
from lightning_gradwatch.core.session import session_of

#: The fewest sampled batches a verdict rests on, when a run ends before a full window.
MIN_SAMPLES = 3


class ActivationCallback(GradwatchCallback, ActivationSubscriber):
    """Subclasses implement the :class:`ActivationSubscriber` methods (fold one sample into the window), and
    :meth:`_fractions` (the window's per-layer fraction and whether the layer was seen, reduced over ranks, on the
    device), :meth:`_describe` and their state."""

    hook_order = HookOrder.ACTIVATIONS
    threshold: float  # the subclass's alert threshold on a layer's fraction
    #: What the subclass reports: ``gradwatch/<metric>/<layer>`` in one chart titled ``chart``, alerts ``alert_kind``.
    metric: ClassVar[str]
    chart: ClassVar[str]
    alert_kind: ClassVar[str]
    #: The keys of the subclass's checkpointed window state (``"layers"`` first: the names they belong to).
    tally_keys: ClassVar[tuple[str, ...]]
    #: Warning when at least this fraction of a layer is affected, or it grew by ``growth`` since crossing the
    #: threshold; ``info`` otherwise.
    most: ClassVar[float] = 0.9
    growth: ClassVar[float] = 0.2

    def __init__(
        self,
        sample_every_n_steps: int,
        window: int,
        log_every_n_steps: int | None,
        layers: list[str] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__()
        self.layers = check_patterns_syntax(layers)
        self.forward_fn = check_forward_fn(forward_fn)
        self.sample_every_n_steps = check_number("sample_every_n_steps", sample_every_n_steps, ge=1, integer=True)
        self.window = check_number("window", window, ge=1, integer=True)
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, ge=1, integer=True, optional=True)
        self._samples = 0  # sampled batches so far (the window's clock)
        self._judged_at = -1  # the sample count at the last verdict
        self._lowest: dict[str, float] = {}  # per layer: its lowest fraction at any verdict (its baseline)
        # the sampled batches' losses; the best window loss at any verdict; per layer, the best when it was lowest
        self._losses = SampledLoss(self.window)
        self._watch_loss = True  # automatic optimization: one loss per step
        self._best_loss = math.inf
        self._loss_at_lowest: dict[str, float] = {}
        self._probe: ActivationProbe | None = None  # set while attached
        self._layers: list[Layer] = []
        # under torch.compile the sampled batches are run again, eagerly (from this step on); None: never watched
        self._eager_from: int | None = None
        self._inactive = False  # the model cannot be watched in this run (warned once)
        self._probe_due = False  # this batch is sampled by running it again after the step
        self._loaded: dict[str, Any] | None = None  # a checkpoint's window, until the next layout adopts it
        self._posted: tuple[int, Tensor] | None = None  # (step, verdict tensor) offered to this step's shared read
        self._step_at_start = -1  # trainer.global_step when the current batch began

    @property
    def attached(self) -> bool:
        return self._probe is not None

    def _attach(self, model: nn.Module) -> None:
        probe = probe_for(model)
        self._layers = probe.layers
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._layout(probe.layers, device)
        probe.subscribe(self)
        self._probe = probe

    def _detach(self, commit: bool = True) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.unsubscribe(self, commit=commit)

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._watch_loss = pl_module.automatic_optimization  # a GAN's losses are no one trend
        compiled = compiled_modules(pl_module)
        self._inactive, self._eager_from = False, None
        # the eager pass would run the unwrapped model outside its sharding; before torch 2.6 it cannot be run
        reason = "its parameters are sharded (FSDP/ModelParallel)" if is_sharded(trainer) else None
        reason = reason or (None if CAN_RUN_EAGERLY else "this torch has no torch.compiler.set_stance (torch >= 2.6)")
        if compiled and reason:
            self._inactive = True
            rank_zero_warn(
                f"{type(self).__name__} is inactive in this run: the model runs under torch.compile "
                f"({', '.join(compiled)}) and {reason}, so its activations cannot be watched without hooks in the "
                "compiled graph. The gradient callbacks are not affected.",
                category=UserWarning,
            )
        elif compiled:
            self._eager_from = BATCHNORM_WARMUP if tracks_batch_statistics(pl_module) else 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_start = trainer.global_step
        # validation, the sanity check and prediction never reach this hook: only training batches are sampled
        step = logger_step(trainer)
        sampled = not self._inactive and not trainer.sanity_checking and step % self.sample_every_n_steps == 0
        if self._eager_from is not None:
            self._probe_due = sampled and step >= self._eager_from
        elif sampled:
            self._attach(pl_module)
            self._begin_sample()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        if self.attached:  # the forward pass is over: fold the sample in, with its loss
            self._detach()
            if self._watch_loss:
                self._losses.record(trainer, self._samples, loss)
            self._samples += 1
        elif self._probe_due and self._watch_loss:  # the sample this batch will be, taken after the step
            self._losses.record(trainer, self._samples, loss)
        # a verdict rides on the step's shared read (the same decision on every rank: counters, not data)
        if (
            self._layers
            and self._samples >= self.window
            and (self._samples > self._judged_at or self._should_log(trainer, self.log_every_n_steps))
        ):
            self._posted = (trainer.global_step, self._verdict_tensor())
            session_of(trainer).shared_read.post(self, self._posted[1], trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._detach()  # a step without backward (manual optimization that skips it)
        # judged once per optimizer step, after its last micro-batch (the step counter moved during the batch);
        # the shared read is keyed by the step being taken, one less than the counter now
        stepped = trainer.global_step > self._step_at_start
        log_now = stepped and (
            self._should_log(trainer, self.log_every_n_steps)
            or (self.log_every_n_steps is None and trainer.log_every_n_steps == 0)  # type: ignore[attr-defined]
        )
        delivered = session_of(trainer).shared_read.take(self, self._step_at_start) if stepped else None
        if _guard_halted(trainer):
            pass  # the run ends on a faulty batch: a verdict on it would be dated after the halt, and say nothing
        elif delivered is not None:
            self._judge(trainer, delivered, log_now)
        elif log_now and self._layers and self._samples >= self.window:
            posted = self._posted[1] if self._posted and self._posted[0] == self._step_at_start else None
            verdict = posted if posted is not None else self._verdict_tensor()
            self._judge(trainer, host_values(verdict)[0], log=True)  # its own transfer
        if self._probe_due:  # after the verdicts: they cover the samples posted before this one
            self._probe_due = False
            if not _guard_halted(trainer):
                self._sample_eagerly(pl_module, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _sample_eagerly(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Take this batch's sample from a pass of its own (under torch.compile): the model's own code run eagerly,
        in eval mode, without gradients; the run's weights, flags and graph are left as they were."""
        try:
            self._attach(pl_module)
            self._begin_sample()
            run_eagerly(self.forward_fn, pl_module, batch)
        except Exception as err:  # a model or batch the pass cannot run: our pass, never the run's end (warned)
            self._detach(commit=False)
            self._inactive = True
            rank_zero_warn(
                f"{type(self).__name__} could not run the model on a training batch under torch.compile and is "
                f"now inactive: {err}",
                category=UserWarning,
            )
            return
        self._detach()
        self._samples += 1

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # new samples since the last verdict (a run shorter than a window: at least MIN_SAMPLES): judge them now
        if (
            self._layers
            and self._samples > self._judged_at
            and self._samples >= min(self.window, MIN_SAMPLES)
            and not _guard_halted(trainer)
        ):
            self._judge(trainer, host_values(self._verdict_tensor())[0], log=True)
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach(commit=False)
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach(commit=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach(commit=False)

    # -- verdicts --------------------------------------------------------------------------------------------
    def _verdict_tensor(self) -> Tensor:
        """The window's per-layer fractions, per-layer 'seen' flags, and its loss (the ranks' medians summed, and how
        many ranks had one), reduced over ranks (collectives: every rank reaches them at the same steps)."""
        fractions, seen = self._fractions(min(self.window, self._samples))
        return torch.cat([fractions, seen.to(fractions.dtype), self._losses.reduced_parts(fractions.device)])

    def _judge(self, trainer: pl.Trainer, values: list[float], log: bool) -> None:
        n = len(self._layers)
        fractions, seen, loss = values[:n], values[n : 2 * n], window_loss(*values[2 * n :])
        self._judged_at = self._samples
        self._best_loss = min(self._best_loss, loss) if math.isfinite(loss) else self._best_loss
        step, metrics, window = trainer.global_step, {}, min(self.window, self._samples)
        for layer, fraction, was_seen in zip(self._layers, fractions, seen, strict=True):
            if not was_seen:
                continue
            if charted(layer.name, self.layers):
                metrics[f"gradwatch/{self.metric}/{layer.name}"] = fraction
            self._verdict(trainer, step, layer, fraction, window, loss)
        if log:
            self._log_metrics(trainer, metrics)

    def _verdict(self, trainer: pl.Trainer, step: int, layer: Layer, fraction: float, window: int, loss: float) -> None:
        """Info when a layer crosses the threshold; a warning (instead, or later) when most of it is affected, or
        when the fraction grew by ``growth`` above its lowest (units that died during training, not a layer sparse
        from initialisation) and the window's loss is not clearly below the best loss the run had reached when the
        layer was at its lowest (a layer shedding units while the loss falls is info). Each is alerted once per
        onset."""
        name, kind, threshold = layer.name, self.alert_kind, self.threshold
        if fraction <= self._lowest.get(name, fraction):  # the latest time at its lowest: the loss to beat since
            self._loss_at_lowest[name] = self._best_loss
        lowest = self._lowest[name] = min(self._lowest.get(name, fraction), fraction)
        info, warning = f"{name}|info", f"{name}|warning"
        if fraction <= threshold:
            self._clear_condition(kind, info, step)
            self._clear_condition(kind, warning, step)
            return
        grew = fraction >= lowest + self.growth
        reference = self._loss_at_lowest.get(name, math.nan)
        shed = grew and improved(loss, reference)  # units gone while the loss kept falling
        severity: Severity = "warning" if fraction >= self.most or (grew and not shed) else "info"
        if severity == "warning":
            self._active_conditions.add((kind, info))  # the warning says it all: no info after it
        else:
            self._clear_condition(kind, warning, step)

        def alert() -> Alert:
            finding = self._describe(layer, step, fraction, window)
            if severity == "warning":
                message = alert_message(self.alert_kind, finding)
            elif shed:
                message = (
                    f"{finding} It grew from {lowest:.0%}, but the training loss kept improving ({reference:.4g} "
                    f"then, {loss:.4g} now): usually a layer shedding units the task does not need (a classifier "
                    "head over a nearly constant [CLS] vector, a VAE encoder). A warning follows if the loss stops "
                    "improving."
                )
            else:
                message = (
                    f"{finding} It stays below {self.most:.0%} and has not grown by {self.growth:.0%}: often a design "
                    "choice (a sparse layer such as a squeeze-excitation gate) in runs that train fine."
                )
            return Alert(step, kind, name, fraction, threshold, message, severity)

        self._set_condition(trainer, kind, warning if severity == "warning" else info, True, alert)

    def _describe(self, layer: Layer, step: int, fraction: float, window: int) -> str:
        raise NotImplementedError

    def _fractions(self, window: int) -> tuple[Tensor, Tensor]:
        """Per layer, on the device and reduced over ranks: the fraction over the last ``window`` samples, and
        whether the layer was seen in them."""
        raise NotImplementedError

    def _begin_sample(self) -> None:
        """A sample is about to be taken (its index is ``self._samples``): make room for it in the window."""

    # -- layout and state ------------------------------------------------------------------------------------
    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        if not self._layers_seen():  # laid out after the first sampled pass: no chart that can never hold data
            return {}
        return {"gradwatch: activations": {self.chart: ["Multiline", [rf"^gradwatch/{self.metric}/"]]}}

    def _layers_seen(self) -> bool:
        """Whether any layer fed an activation this callback watches so far."""
        return True

    def _tallies(self) -> dict[str, Any] | None:
        """The window's state on the host, keyed by :attr:`tally_keys`; ``None`` before the layout."""
        raise NotImplementedError

    def _forget_layout(self) -> None:
        """Drop the per-layer buffers: the next sampled step lays them out again (adopting loaded tallies)."""
        raise NotImplementedError

    def _take_loaded(self, names: list[str]) -> dict[str, Any] | None:
        """A loaded checkpoint's window if it belongs to the layers ``names`` (once; then it is used up)."""
        loaded, self._loaded = self._loaded, None
        return loaded if loaded is not None and loaded.get("layers") == names else None

    @override
    def _extra_state(self) -> dict[str, Any]:
        # saved again before the first sampled step after a resume: the loaded window is still current
        tallies = self._tallies() or self._loaded or {}
        # the ring of sampled losses is not saved: after a resume the window's loss rests on the samples since
        return {
            "samples": self._samples,
            "judged_at": self._judged_at,
            "lowest": dict(self._lowest),
            "best_loss": self._best_loss,
            "loss_at_lowest": dict(self._loss_at_lowest),
            **tallies,
        }

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        self._samples = int(state.get("samples", 0))
        self._judged_at = int(state.get("judged_at", -1))
        self._lowest = {str(k): float(v) for k, v in state.get("lowest", {}).items()}
        self._best_loss = float(state.get("best_loss", math.inf))
        self._loss_at_lowest = {str(k): float(v) for k, v in state.get("loss_at_lowest", {}).items()}
        self._forget_layout()  # laid out again, from the checkpoint's window, at the next sampled step
        if "layers" in state and all(k in state for k in self.tally_keys):
            self._loaded = {k: state[k] for k in self.tally_keys}
        return []


def _guard_halted(trainer: pl.Trainer) -> bool:
    """Whether a guard stopped this fit (the same on every rank: its decisions are reduced)."""
    return session_of(trainer).stopped_by_gradwatch(trainer)
