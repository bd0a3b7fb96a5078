"""GradientNormLogger: per-layer gradient norms, gradient-to-weight ratios and vanishing/exploding alerts."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._charts import (
    DEFAULT_MAX_SERIES,
    GROUPINGS,
    ChartPlan,
    check_patterns_syntax,
)
from lightning_gradwatch._loss_trace import LossHistory, fetch_with_history
from lightning_gradwatch._params import ParamGroups, optimizer_index
from lightning_gradwatch._precision import grad_scaler, loss_scale
from lightning_gradwatch._reporting import host_values, logger_step
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch._types import AtLeastFiveInt, AtLeastOne, GreaterThanOne, Null, PositiveFloat, PositiveInt
from lightning_gradwatch._validation import check_bool, check_choice, check_number
from lightning_gradwatch.alerts import Alert
from lightning_gradwatch.core.callback import GradwatchCallback, HookOrder
from lightning_gradwatch.core.session import session_of
from lightning_gradwatch.functional._scalars import Scalar, as_float, isfinite
from lightning_gradwatch.functional.norms import total_norm, validate_norm_type
from lightning_gradwatch.gradients._gradient_rules import (
    Diagnosis,
    ExplodingRule,
    GradientReading,
    StoppedRule,
    UnderflowRule,
    UpdateRatioRule,
    VanishingRule,
)
from lightning_gradwatch.gradients._norm_charts import FlowPictures, NormCharts
from lightning_gradwatch.gradients._norm_intervals import NormIntervals
from lightning_gradwatch.gradients._norm_ring import NormRing, combine_on_host
from lightning_gradwatch.gradients._update_ratio import UpdateTracker


class GradientNormLogger(GradwatchCallback):
    r"""Log the global and per-layer gradient norms and gradient-to-weight ratios; alert on vanishing or
    exploding gradients.

    Norms are of the real, unscaled gradients under every precision (16-mixed with a GradScaler, fused
    optimizers included; bf16; 32), taken in ``on_before_optimizer_step``: after gradient accumulation and
    the DDP all-reduce, before any clipping by other callbacks or the Trainer. On steps that do not log
    nothing is computed; on logging steps the norms are computed on device with ``foreach`` kernels and
    brought to the host in one transfer. Under FSDP the norms of the local shards are all-reduced so the
    logged values are those of the full parameters.

    Logged metrics (to every Lightning logger; TensorBoard also gets a grouped custom-scalars layout):

    - ``gradwatch/global/grad_norm``: the norm of all gradients (``..._optimizer{i}`` with several optimizers).
    - ``gradwatch/grad_norm/{layer}``: the norm of each layer's gradients.
    - ``gradwatch/grad_to_weight/{layer}``: ``||grad|| / ||weight||`` of each layer.
    - ``gradwatch/grad_hist/{layer}``: gradient histograms (TensorBoard only), if enabled.

    Alerts (see :class:`~lightning_gradwatch.Alert`), decided on logging steps:

    - ``exploding_gradient``: the largest global norm since the previous logging step (tracked on the device on
      every step, with its step) is above ``exploding_threshold``, or ``exploding_factor`` times the median of the
      norms logged before. A warning when the norm stays high or comes back, or one step is 100x past the limit;
      a single transient is ``info``.
    - ``vanishing_gradient``: the first layer's gradient RMS over its non-zero elements is below
      ``vanishing_threshold`` and below ``vanishing_ratio`` times that of the layers nearest the loss (the last
      quarter of the layers).
    - ``stopped_layer``: a layer whose gradient was non-zero before has been exactly zero on every step for
      ``stop_after_steps`` steps (a collapsed network). A layer never used is ignored.

    Steps the GradScaler skips for overflow are neither logged nor checked, and non-finite norms never enter the
    statistics (they are :class:`~lightning_gradwatch.NaNGuard`'s business).

    Args:
        norm_type: the ``p`` of the p-norm: a number >= 1, or ``"inf"`` for the max-abs norm.
        group_by: ``"module"`` to report one norm per module (its weight and bias together),
            ``"parameter"`` for one per parameter, or ``"block"`` to chart one series per repeated block (a
            transformer layer, a ResNet block: norms combined as root-sum-of-squares, ratios of the combined
            norms, fractions weighted by size) while still judging, and naming, each module.
        layers: ``fnmatch`` patterns of the layers to chart (``"!pattern"`` leaves layers out); ``None``: all.
            Only the charts change: every layer is still judged.
        max_series: at most this many per-layer series per metric; past it the layers are charted per block (said
            once). ``None``: every layer, however many.
        log_every_n_steps: log every this many optimizer steps; ``None`` follows the Trainer's
            ``log_every_n_steps``.
        log_grad_to_weight: also log each layer's gradient-to-weight norm ratio.
        histogram_every_n_steps: write per-layer gradient histograms to TensorBoard every this many steps
            (each costs a host copy of the gradients); ``None`` disables them.
        vanishing_threshold: gradient RMS (over non-zero elements) below which the first layer may be vanishing;
            ``None`` disables the vanishing alert.
        vanishing_ratio: ...and the fraction of the RMS of the layers nearest the loss below which it is.
        exploding_threshold: global gradient norm above which gradients are exploding; ``None`` disables the
            absolute rule.
        exploding_factor: a global norm this many times the median of the last ``history_size`` logged
            norms is an explosion; ``None`` disables the relative rule.
        history_size: how many logged global norms the relative rule remembers (it starts once 5 are known).
        stop_after_steps: steps of exactly zero gradient after which a layer that had one is stopped; ``None``
            disables the check.
        log_update_to_weight: log each layer's update-to-weight ratio ``||delta w|| / ||w||`` (a copy of the weights
            on the step before each logging step, in device memory until that step).
        update_ratio_high: the median ratio over the layers above which updates are too large (``info``; a warning
            above 5 times it), held for 100+ steps; ``None`` disables the alert (frozen layers are still reported).
        gradient_flow_every_n_steps: draw the gradient-flow picture (gradient RMS against depth, a few steps
            overlaid) into TensorBoard every this many steps (it is also saved with the health report); needs
            matplotlib (the ``plots`` extra); ``None``: never into TensorBoard.

    Raises:
        ValueError: an argument outside its range, naming it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradientNormLogger

        trainer = Trainer(callbacks=[GradientNormLogger()], log_every_n_steps=25)
    """

    hook_order = HookOrder.GRADIENT_NORMS

    def __init__(
        self,
        norm_type: AtLeastOne | Literal["inf"] = 2.0,
        group_by: Literal["module", "parameter", "block"] = "module",
        log_every_n_steps: PositiveInt | Null = None,
        log_grad_to_weight: bool = True,
        histogram_every_n_steps: PositiveInt | Null = None,
        vanishing_threshold: PositiveFloat | Null = 1e-5,
        vanishing_ratio: PositiveFloat = 1e-3,
        exploding_threshold: PositiveFloat | Null = 1e3,
        exploding_factor: GreaterThanOne | Null = 10.0,
        history_size: AtLeastFiveInt = 20,
        stop_after_steps: PositiveInt | Null = 20,
        log_update_to_weight: bool = True,
        update_ratio_high: PositiveFloat | Null = 2e-2,
        gradient_flow_every_n_steps: PositiveInt | Null = 500,
        layers: list[str] | None = None,
        max_series: PositiveInt | Null = DEFAULT_MAX_SERIES,
    ) -> None:
        super().__init__()
        self.norm_type = validate_norm_type(norm_type)
        self.group_by = check_choice("group_by", group_by, GROUPINGS)
        self._judged_by = "module" if self.group_by == "block" else self.group_by  # what alerts name
        self.layers = check_patterns_syntax(layers)
        positive_int: dict[str, Any] = {"ge": 1, "integer": True, "optional": True}
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, **positive_int)
        self.log_grad_to_weight = check_bool("log_grad_to_weight", log_grad_to_weight)
        self.histogram_every_n_steps = check_number("histogram_every_n_steps", histogram_every_n_steps, **positive_int)
        self.vanishing_threshold = check_number("vanishing_threshold", vanishing_threshold, gt=0, optional=True)
        self.vanishing_ratio = check_number("vanishing_ratio", vanishing_ratio, gt=0)
        self.exploding_threshold = check_number("exploding_threshold", exploding_threshold, gt=0, optional=True)
        self.exploding_factor = check_number("exploding_factor", exploding_factor, gt=1, optional=True)
        self.history_size = check_number("history_size", history_size, ge=5, integer=True)
        self.stop_after_steps = check_number("stop_after_steps", stop_after_steps, **positive_int)
        self.log_update_to_weight = check_bool("log_update_to_weight", log_update_to_weight)
        self.update_ratio_high = check_number("update_ratio_high", update_ratio_high, gt=0, optional=True)
        self.gradient_flow_every_n_steps = check_number(
            "gradient_flow_every_n_steps", gradient_flow_every_n_steps, **positive_int
        )
        self._pictures = FlowPictures(self.norm_type, self.gradient_flow_every_n_steps)
        self._vanishing = VanishingRule(self.vanishing_threshold, self.vanishing_ratio)
        self._stopped = StoppedRule(self.stop_after_steps)
        self._diagnoses: dict[str, Diagnosis] = {}  # per optimizer suffix
        self._loaded_history: dict[str, list[float]] = {}  # a checkpoint's norm history, until its rule exists
        self._updates: dict[str, UpdateTracker] = {}
        self._intervals = NormIntervals()  # per optimizer suffix, on the device, for the current logging interval
        self.max_series = check_number("max_series", max_series, **positive_int)
        self._charts = NormCharts(self.norm_type, self.group_by, self.layers, self.max_series)

    @property
    def _history(self) -> dict[str, list[float]]:
        """The global norms logged so far, per optimizer suffix (what the relative exploding rule compares to)."""
        found = {suffix: diagnosis.exploding.history for suffix, diagnosis in self._diagnoses.items()}
        return {**self._loaded_history, **found}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            norm_type=self.norm_type, group_by=self.group_by, log_every_n_steps=self.log_every_n_steps
        )

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pictures.start()
        self._intervals.start()
        self._charts.start(pl_module)
        super().on_fit_start(trainer, pl_module)

    @override
    def _before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
    ) -> None:
        if step.repeat:
            return  # a closure optimizer re-evaluates a step already seen
        if not step.grads:  # the guard dropped this update: a logging step still logs what was finite
            if self._should_log(trainer, self.log_every_n_steps) and step.has_norms(self.norm_type):
                self._log_finite(trainer, step)
            return
        groups = step.index.grouping(self._judged_by)
        suffix = _optimizer_suffix(trainer, step.optimizer)
        on_host = step.host_is_free  # a CPU: the interval's tally is a few floats, folded without a tensor op
        names = groups.group_names
        tally = self._intervals.for_step(suffix, names, step.device, on_host)
        if on_host:
            global_norm_now = float(step.global_norm(self.norm_type))  # the shared pass, read for free
            overflow_now = bool(_overflow_flag(step, global_norm_now) > 0)
            norms = step.param_norms_on_host(self.norm_type)
            tally.fold_on_host(trainer.global_step, global_norm_now, norms, groups.group_of_param, overflow_now)
            on_layers = combine_on_host(norms, groups.group_of_param, len(names), self.norm_type)
            self._pictures.rings.setdefault(suffix, NormRing()).push(
                names, groups.group_numels, logger_step(trainer), trainer.global_step, on_layers
            )
        if self.histogram_every_n_steps is not None and (logger_step(trainer) + 1) % self.histogram_every_n_steps == 0:
            self._charts.write_histograms(trainer, groups, step)
        logs = self._should_log(trainer, self.log_every_n_steps)
        if logs or not on_host:
            layer_norms = groups.combine(step.param_norms(self.norm_type), self.norm_type)  # the shared pass
            global_norm = total_norm(layer_norms, self.norm_type)
            overflow = cast(Tensor, _overflow_flag(step, global_norm))  # a tensor norm in: a tensor
            if not on_host:
                tally.fold(trainer.global_step, global_norm, layer_norms, overflow)  # every step, on the device
                ring = self._pictures.rings.setdefault(suffix, NormRing())  # kept for a failed run's charts
                ring.push(names, groups.group_numels, logger_step(trainer), trainer.global_step, layer_norms)
            if logs:
                self._log_norms(trainer, groups, step, layer_norms, global_norm, overflow, suffix)
        if self.log_update_to_weight and self._logs_next_step(trainer, self.log_every_n_steps):
            self._updates.setdefault(suffix, UpdateTracker()).snapshot(step)  # compared at the logging step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if session_of(trainer).stopped_by_gradwatch(trainer):
            self._pictures.write_evidence(trainer)
        self._judge_unfinished_intervals(trainer)
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._pictures.write_evidence(trainer)
        super().on_exception(trainer, pl_module, exception)

    # -- internals -------------------------------------------------------------------------------------------
    def _judge_unfinished_intervals(self, trainer: pl.Trainer) -> None:
        """An explosion after the last logging step is judged when training ends (its peak, and the step of it)."""
        for suffix, peak, peak_step in self._intervals.unfinished():
            if peak <= 0 or peak_step <= self._pictures.last_logged.get(suffix, -1) or suffix not in self._diagnoses:
                continue
            reading = GradientReading(
                step=trainer.global_step,
                names=[],
                norms=[],
                active_rms=[],
                silent_steps=[],
                global_norm=peak,
                peak=peak,
                peak_step=peak_step,
                norm_label="inf" if math.isinf(self.norm_type) else f"{self.norm_type:g}",
            )
            verdict = self._diagnoses[suffix].exploding.check(reading, "(the model)")
            if verdict is not None:
                key = suffix + ("|warning" if verdict.key == "warning" else "|info")
                self._set_condition(trainer, verdict.kind, key, True, functools.partial(verdict.alert, reading.step))

    def _log_finite(self, trainer: pl.Trainer, step: StepGradients) -> None:
        """A logging step whose update the guard dropped: its finite per-layer norms are still logged."""
        groups = step.index.grouping(self._judged_by)
        (values,) = host_values(groups.combine(step.param_norms(self.norm_type), self.norm_type))
        plan = self._charts.plan(groups.group_names)
        norms = plan.norms(values, self.norm_type)
        metrics = {f"gradwatch/grad_norm/{n}": v for n, v in zip(plan.names, norms, strict=True) if math.isfinite(v)}
        self._log_metrics(trainer, metrics)

    def _log_norms(
        self,
        trainer: pl.Trainer,
        groups: ParamGroups,
        step: StepGradients,
        layer_norms: Tensor,
        global_norm: Tensor,
        overflow: Tensor,
        suffix: str,
    ) -> None:
        plan = self._charts.plan(groups.group_names)
        fetched, extra, history = self._fetch(trainer, groups, step, layer_norms, global_norm, overflow, suffix, plan)
        (total,), (skipped,), (peak,), (peak_step,), (loss_scale,), per_layer, nonzero, last_nonzero = fetched
        if skipped > 0:
            return  # the GradScaler skips this step for overflow: normal under fp16, nothing to report
        present = sorted({groups.group_of_param[i] for i in step.positions})
        numels = groups.group_numels.tolist()  # host tensor: no sync
        zeros = [1.0 - nonzero[g] / numels[g] if numels[g] else 0.0 for g in range(len(numels))]
        metrics = {f"gradwatch/global/grad_norm{suffix}": total}
        metrics.update(self._charts.series_metrics(plan, present, per_layer, zeros, numels, dict(extra)))
        self._log_metrics(trainer, metrics)
        if not math.isfinite(total):
            return  # non-finite gradients: NaNGuard's business; never folded into the statistics
        now, scaled = trainer.global_step, grad_scaler(trainer) is not None
        reading = GradientReading(
            step=now,
            names=[groups.group_names[g] for g in present],
            norms=[per_layer[g] for g in present],
            active_rms=[per_layer[g] / math.sqrt(nonzero[g]) if nonzero[g] > 0 else 0.0 for g in present],
            silent_steps=[now - int(last_nonzero[g]) if last_nonzero[g] >= 0 else -1 for g in present],
            global_norm=total,
            peak=max(peak, total),
            peak_step=int(peak_step) if peak > total else now,
            norm_label="inf" if math.isinf(self.norm_type) else f"{self.norm_type:g}",
            zero_fraction=[zeros[g] for g in present],
            update_ratios=[extra["update_to_weight"][g] for g in present] if "update_to_weight" in extra else None,
            loss_scale=loss_scale if scaled else None,
            loss_improving=history.improving() if history is not None else None,
            half_unscaled=not scaled and any(g.dtype == torch.float16 for g in step.grads),
        )
        self._pictures.last_logged[suffix] = now
        self._judge(trainer, reading, suffix)
        self._pictures.draw(trainer, reading.step, reading.names, reading.active_rms, suffix)

    def _fetch(
        self,
        trainer: pl.Trainer,
        groups: ParamGroups,
        step: StepGradients,
        layer_norms: Tensor,
        global_norm: Tensor,
        overflow: Tensor,
        suffix: str,
        plan: ChartPlan,
    ) -> tuple[list[list[float]], dict[str, list[float]], LossHistory | None]:
        """The logging step's one host transfer (the loss history riding along), closing its interval: the eight
        fixed values, the optional per-layer ratios by name, and the loss history."""
        tally = self._intervals.restart(suffix, global_norm.device)
        active = groups.combine(step.nonzero_counts(), 1.0)
        peak_now, peak_step_now, last_nonzero_now = tally.tensors(global_norm.device)
        scale = loss_scale(trainer, global_norm.device)
        to_fetch = [global_norm, overflow, peak_now, peak_step_now, scale, layer_norms, active, last_nonzero_now]
        optional: dict[str, Tensor] = {}
        tracker = self._updates.get(suffix)
        ratios = tracker.ratios(step, groups) if tracker is not None else None
        if self.log_grad_to_weight or (plan.grouped and ratios is not None):
            weight_norms = groups.combine(step.weight_norms(self.norm_type), self.norm_type)
            if self.log_grad_to_weight:
                optional["grad_to_weight"] = layer_norms / weight_norms.clamp_min(1e-12)
            if plan.grouped:  # a block's ratios are of its combined norms
                optional["weight_norm"] = weight_norms
        if ratios is not None:
            optional["update_to_weight"] = ratios
        fetched, history = fetch_with_history(trainer, session_of(trainer).loss_trace, *to_fetch, *optional.values())
        return fetched[:8], dict(zip(optional, fetched[8:], strict=True)), history

    @override
    def _report_pictures(self, trainer: pl.Trainer, directory: str) -> list[tuple[str, str]]:
        return self._pictures.report_pictures(directory)

    def _judge(self, trainer: pl.Trainer, reading: GradientReading, suffix: str) -> None:
        diagnosis = self._diagnoses.get(suffix)
        if diagnosis is None:
            exploding = ExplodingRule(self.exploding_threshold, self.exploding_factor, self.history_size)
            exploding.history = self._loaded_history.pop(suffix, [])
            diagnosis = self._diagnoses[suffix] = Diagnosis(
                exploding,
                self._vanishing,
                self._stopped,
                UpdateRatioRule(self.update_ratio_high),
                UnderflowRule(),
            )
        for kind, key, verdict in diagnosis.check(reading):
            make_alert = functools.partial(verdict.alert, reading.step) if verdict is not None else _no_alert
            self._set_condition(trainer, kind, suffix + key, verdict is not None, make_alert)

    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        return self._charts.layout(pl_module, self._judged_by, self.log_grad_to_weight, self.log_update_to_weight)

    # -- state -----------------------------------------------------------------------------------------------
    @override
    def _config(self) -> dict[str, Any]:
        return {"norm_type": self.norm_type}

    @override
    def _extra_state(self) -> dict[str, Any]:
        # the unfinished intervals too: an explosion just before a checkpoint is reported after resuming from it
        return {"norm_history": self._history, "intervals": self._intervals.state()}

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        self._diagnoses.clear()
        self._loaded_history = {}
        self._intervals.forget_loaded()
        if "norm_type" in changed:  # norms of another p are not comparable: the relative rule starts afresh
            return ["the global-norm history of the relative exploding rule"] if state.get("norm_history") else []
        self._loaded_history = {str(k): [float(x) for x in v] for k, v in state.get("norm_history", {}).items()}
        self._intervals.load(state.get("intervals", {}))
        return []


def _no_alert() -> Alert:
    """The alert of a condition that is not firing: never made."""
    raise AssertionError("a condition that is not firing makes no alert")


def _overflow_flag(step: StepGradients, global_norm: Scalar) -> Scalar:
    """1.0 on a step the GradScaler will skip for overflow, else 0.0: a device tensor (no sync), or a float for
    a norm read on the host."""
    if step.found_inf is not None:
        if not isinstance(global_norm, Tensor):
            return float(step.found_inf)
        return step.found_inf.to(global_norm.device)
    if step.has_scaler:
        # fused optimizers check for inf inside their own step: non-finite scaled grads mean a skip there too
        return 1.0 - as_float(isfinite(global_norm))
    return torch.zeros((), device=global_norm.device) if isinstance(global_norm, Tensor) else 0.0


def _optimizer_suffix(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> str:
    if len(trainer.optimizers) <= 1:
        return ""
    return f"_optimizer{optimizer_index(trainer, optimizer)}"
