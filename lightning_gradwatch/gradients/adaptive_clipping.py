"""AdaptiveClipping: gradient clipping at a threshold learned from the run's own gradient-norm history."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._distributed import is_sharded
from lightning_gradwatch._loss_trace import fetch_with_history
from lightning_gradwatch._params import local_tensor, optimizer_index
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch._types import (
    AtLeastOne,
    GreaterThanOne,
    Null,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    UnitFraction,
)
from lightning_gradwatch._validation import check_choice, check_number
from lightning_gradwatch.alerts import Alert, AlertKind, alert_message
from lightning_gradwatch.core.callback import GradwatchCallback, HookOrder
from lightning_gradwatch.core.session import session_of
from lightning_gradwatch.functional._scalars import Flag, Scalar, as_float, where
from lightning_gradwatch.functional.clipping import apply_clip_coefficient, clip_coefficient
from lightning_gradwatch.functional.norms import validate_norm_type
from lightning_gradwatch.gradients._clip_rules import AGCRule, ClipInterval, NormStatistics, PercentileRule, ZScoreRule

ClipMode = Literal["zscore", "percentile", "agc"]
CLIP_MODES: tuple[str, ...] = ("zscore", "percentile", "agc")


class AdaptiveClipping(GradwatchCallback):
    r"""Clip gradients to a threshold learned from the run's own gradient-norm history; report spikes.

    Three rules (``mode``):

    - ``"zscore"`` (default, in the spirit of ZClip, 2025): an exponential moving average of the mean and
      variance of the global gradient norm. A norm above ``mean + z_threshold * std`` is clipped, and the
      farther out it is the closer to the mean it is brought (``mean + z_threshold * std * z_threshold / z``):
      an outlier batch leaves the hook at the size of an ordinary step. The statistics are fed the clipped
      norm, so a spike cannot inflate the variance and switch clipping off afterwards.
    - ``"percentile"`` (in the spirit of AutoClip, 2020): the threshold is the ``quantile`` of the last
      ``history_size`` global norms, kept in a ring buffer on the device. The history takes the raw norms
      (one spike moves a quantile by one rank only; clipped values would ratchet the threshold down).
    - ``"agc"`` (Adaptive Gradient Clipping, NFNets 2021): each output unit (row) of every weight of 2 or more
      dimensions is clipped so that ``||G_unit|| <= clip_factor * max(||W_unit||, agc_eps)``. 1-D parameters
      (biases, norm gains: a zero-initialised bias would never move) and the output layer are left alone, as
      in the paper (see ``agc_exclude``); the z-score rule stays on as a backstop, since a spike through
      those parameters alone can still wreck a run.

    Clipping happens in ``on_before_optimizer_step``: after gradient accumulation and the DDP all-reduce, on
    the real (unscaled) gradients under every precision, in automatic and manual optimization alike. Every
    decision is computed on the device and applied with ``foreach`` kernels, like ``clip_grad_norm_``: no
    host sync per step; one transfer on logging steps. Under DDP the gradients are identical on every rank,
    so every rank takes the same decision without a collective; under FSDP the global norm is all-reduced
    across shards (the one collective, inherent to any global-norm clipping).

    During the first ``warmup_steps`` steps the statistics are gathered and only norms above ``warmup_cap``
    times their running mean are clipped (a safety cap against a spike before the statistics are ready).
    Steps the GradScaler skips for overflow under 16-mixed, and any non-finite norm under bf16/32 (which is
    :class:`~lightning_gradwatch.NaNGuard`'s business), are neither clipped nor folded into the statistics.

    Logged metrics (on logging steps; ``_optimizer{i}`` appended with several optimizers):

    - ``gradwatch/clip/pre_clip_norm``: the global gradient norm before clipping.
    - ``gradwatch/clip/threshold``: the global norm the gradients are clipped to if above it (in ``"agc"``
      mode, the z-score backstop's).
    - ``gradwatch/clip/coefficient``: the factor applied (the smallest unit factor in ``"agc"`` mode).
    - ``gradwatch/clip/clipped_fraction``: the fraction of steps clipped since the previous logging step.
    - ``gradwatch/clip/ema_mean``, ``gradwatch/clip/ema_std``: the norm statistics.
    - ``gradwatch/clip/spikes``: the number of spikes since the previous logging step.

    Alerts: ``gradient_spike`` when, since the previous logging step, a step's pre-clip norm reached
    ``alert_ratio`` times ``mean + z_threshold * std`` (in every mode); at most one alert per logging
    interval, naming the worst spike and how many there were.

    Args:
        mode: ``"zscore"``, ``"percentile"`` or ``"agc"``.
        z_threshold: in ``"zscore"`` mode, how many standard deviations above the mean a norm may be; in every
            mode, the base of spike detection.
        ema_decay: the decay of the moving mean and variance (``1 / (1 - ema_decay)`` steps of memory).
        quantile: in ``"percentile"`` mode, the quantile of the history to clip to.
        history_size: in ``"percentile"`` mode, how many past norms the quantile is taken over.
        clip_factor: in ``"agc"`` mode, the largest allowed ratio of a unit's gradient norm to its weight norm.
        agc_eps: in ``"agc"`` mode, the floor of a unit's weight norm.
        agc_exclude: in ``"agc"`` mode, ``fnmatch`` patterns of parameter names left unclipped; ``None``
            excludes the last parameter of 2 or more dimensions in model order (normally the output layer),
            ``[]`` excludes nothing.
        warmup_steps: how many finite norms to gather before adaptive clipping starts.
        warmup_cap: during warm-up, clip norms above this many times the running mean; ``None``: no clipping
            during warm-up. A warm-up norm this many times below the mean restarts the statistics from it (the
            first norms were a blow-up, not a baseline).
        initial_max_norm: before any statistics exist (the first finite step), clip the global norm to this; a
            gradient that large at the first step wrecks the weights before anything can be learned from it.
            ``None``: no ceiling.
        norm_type: the ``p`` of the global p-norm: a number >= 1, or ``"inf"``.
        alert_ratio: a pre-clip norm at least this many times ``mean + z_threshold * std`` is a spike.
        log_every_n_steps: log and check for spikes every this many optimizer steps; ``None`` follows the
            Trainer's ``log_every_n_steps``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import AdaptiveClipping

        trainer = Trainer(callbacks=[AdaptiveClipping()])  # z-score clipping with safe defaults
    """

    hook_order = HookOrder.CLIPPING
    single_instance = True

    def __init__(
        self,
        mode: ClipMode = "zscore",
        z_threshold: PositiveFloat = 3.0,
        ema_decay: OpenUnitInterval = 0.97,
        quantile: UnitFraction = 0.9,
        history_size: PositiveInt = 1000,
        clip_factor: PositiveFloat = 0.1,
        agc_eps: PositiveFloat = 1e-3,
        agc_exclude: Sequence[str] | None = None,
        warmup_steps: PositiveInt = 25,
        warmup_cap: GreaterThanOne | Null = 10.0,
        initial_max_norm: PositiveFloat | Null = 1e3,
        norm_type: AtLeastOne | Literal["inf"] = 2.0,
        alert_ratio: AtLeastOne = 5.0,
        log_every_n_steps: PositiveInt | Null = None,
    ) -> None:
        super().__init__()
        self.mode: ClipMode = check_choice("mode", mode, CLIP_MODES)
        self.rule = _make_rule(
            self.mode,
            z_threshold,
            warmup_steps,
            warmup_cap,
            initial_max_norm,
            quantile,
            history_size,
            clip_factor,
            agc_eps,
            agc_exclude,
        )
        self.ema_decay = check_number("ema_decay", ema_decay, gt=0, lt=1)
        self.norm_type = validate_norm_type(norm_type)
        self.alert_ratio = check_number("alert_ratio", alert_ratio, ge=1)
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, ge=1, integer=True, optional=True)
        self._stats: dict[int, NormStatistics] = {}  # per optimizer index
        self._intervals: dict[int, ClipInterval] = {}
        self._interval_start: dict[int, int] = {}  # the first step of each optimizer's current logging interval
        self._loaded: dict[int, dict[str, Any]] = {}  # a checkpoint's state, adopted at the optimizer's next step
        self._spiky_intervals: dict[int, int] = {}  # consecutive logging intervals with spikes, per optimizer
        self._warned_trainer_clipping = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.mode == "agc" and is_sharded(trainer):
            raise ValueError(
                "`mode`='agc' needs whole weight rows on each rank and is not supported with sharded strategies "
                "(FSDP, ModelParallelStrategy); use mode='zscore' or 'percentile'."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and clip_val > 0 and not self._warned_trainer_clipping:
            self._warned_trainer_clipping = True
            rank_zero_warn(
                f"AdaptiveClipping is used together with Trainer(gradient_clip_val={clip_val}): both clip, "
                "the Trainer after AdaptiveClipping, so the tighter limit wins on each step. Remove "
                "`gradient_clip_val` to let AdaptiveClipping decide alone."
            )
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index in list(self._intervals):  # spikes after the last logging step are reported, once
            self._report(trainer, index, final=True)
        super().on_train_end(trainer, pl_module)

    @override
    def _before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
    ) -> None:
        if not step.grads:
            return
        index = optimizer_index(trainer, optimizer)
        on_host = step.host_is_free  # on a CPU the statistics are floats: the rule costs microseconds
        stats, interval = self._state_for(index, step.device, on_host, trainer.global_step)
        norm_now = step.global_norm(self.norm_type)  # shared with the guard and the norm logger: no extra pass
        # a step with no gradient at all says nothing about the gradient's scale: folded in, zeros would teach a
        # zero threshold that clips every later step, the recovery included, to nothing
        valid: Flag = torch.isfinite(norm_now) & (norm_now > 0)
        norm: Scalar = norm_now
        if step.found_inf is not None:
            valid = valid & (step.found_inf.to(step.device) == 0)
        if on_host:
            norm, valid = float(norm), bool(valid)

        ceiling = self.rule.ceiling(stats)  # what the statistics are fed at most; the spike reference
        threshold = self.rule.threshold(stats, norm)
        unit_factor = self._clip_units(index, step, valid) if isinstance(self.rule, AGCRule) else None
        coefficient = where(valid, clip_coefficient(norm, threshold), 1.0)
        if not (on_host and coefficient >= 1.0):  # on a CPU, skip the multiplication by 1 that most steps would do
            apply_clip_coefficient(step.grads, coefficient)
            step.gradients_changed()
        if unit_factor is not None:
            coefficient = coefficient * unit_factor  # what the most clipped unit got, for the logs
            step.gradients_changed()
        if step.repeat:
            return  # another evaluation of the same step (LBFGS): clipped alike, counted once

        self.rule.fold(stats, norm, valid, self.ema_decay, ceiling)
        if isinstance(self.rule, PercentileRule):
            self.rule.push(stats, norm, valid)
        clipped = valid & (coefficient < 1.0)
        stats.total_clipped = stats.total_clipped + as_float(clipped)
        stats.total_steps = stats.total_steps + as_float(valid)
        interval.record(trainer.global_step, norm, valid, ceiling, threshold, coefficient, self.alert_ratio)
        if self._should_log(trainer, self.log_every_n_steps):
            self._report(trainer, index)

    # -- internals -------------------------------------------------------------------------------------------
    def _state_for(
        self, index: int, device: torch.device, on_host: bool, step: int
    ) -> tuple[NormStatistics, ClipInterval]:
        stats = self._stats.get(index)
        if stats is None:
            history_size = self.rule.history_size if isinstance(self.rule, PercentileRule) else 1
            stats = NormStatistics.zeros(device, history_size, on_host)
            interval = ClipInterval.zeros(device, on_host)
            loaded = self._loaded.pop(index, None)
            if loaded is not None:
                stats.load(loaded.get("statistics", {}))
                interval.load(loaded.get("interval", {}))
                step = int(loaded.get("interval_start", step))
            self._stats[index], self._intervals[index] = stats, interval
            self._interval_start[index] = step
        elif stats.history.device != device or stats.on_host != on_host:
            self._stats[index] = stats = stats.placed(device, on_host)
            self._intervals[index] = self._intervals[index].placed(device, on_host)
        return stats, self._intervals[index]

    def _clip_units(self, index: int, step: StepGradients, valid: Flag) -> Scalar:
        assert isinstance(self.rule, AGCRule)
        rule = self.rule
        # which parameters are clipped unit-wise, rebuilt with the index when the optimizer's groups change
        mask = step.index.derived(
            ("agc_unit_clipped", id(self)), lambda: rule.unit_clipped(step.params, step.index.names)
        )
        chosen = [k for k, i in enumerate(step.positions) if mask[i]]
        weights = [local_tensor(step.params[step.positions[k]].detach()) for k in chosen]
        return self.rule.clip_units(weights, [step.grads[k] for k in chosen], step.unscale, valid)

    def _report(self, trainer: pl.Trainer, index: int, final: bool = False) -> None:
        """The one host transfer of a logging step: metrics, and at most one spike alert for the interval."""
        interval = self._intervals[index]
        stats = self._stats[index]
        scalars = (*interval.scalar_values(), stats.mean, stats.var)
        fetched, history = fetch_with_history(
            trainer, session_of(trainer).loss_trace, *(v for v in scalars if isinstance(v, Tensor))
        )
        tensors = iter(fetched)  # the host path keeps its statistics as floats: only tensors were fetched
        *reported, mean, var = [next(tensors)[0] if isinstance(v, Tensor) else float(v) for v in scalars]
        improving = history.improving() if history is not None else None
        values = interval.named(reported)
        steps = int(values["steps"])
        start, end = self._interval_start.get(index, trainer.global_step), trainer.global_step
        self._intervals[index] = ClipInterval.zeros(stats.history.device, stats.on_host)
        self._interval_start[index] = end + 1
        if steps == 0:
            return

        suffix = f"_optimizer{index}" if len(trainer.optimizers) > 1 else ""
        if not final:
            metrics = {
                f"gradwatch/clip/pre_clip_norm{suffix}": values["last_norm"],
                f"gradwatch/clip/coefficient{suffix}": values["last_coefficient"],
                f"gradwatch/clip/clipped_fraction{suffix}": values["clipped"] / steps,
                f"gradwatch/clip/ema_mean{suffix}": mean,
                f"gradwatch/clip/ema_std{suffix}": math.sqrt(max(var, 0.0)),
                f"gradwatch/clip/spikes{suffix}": values["spikes"],
                f"gradwatch/clip/threshold{suffix}": values["last_threshold"],
            }
            self._log_metrics(trainer, {k: v for k, v in metrics.items() if math.isfinite(v)})
        count = int(values["spikes"])
        self._spiky_intervals[index] = self._spiky_intervals.get(index, 0) + 1 if count else 0
        if count:
            # a handled transient is worth knowing; spikes on many steps, or interval after interval, are a problem
            frequent = (count >= 3 and count >= 0.1 * steps) or self._spiky_intervals[index] >= 3
            # clipped spikes while the loss keeps improving (a run leaving its plateau) hurt nothing: info at most
            severity = "warning" if frequent and not improving else "info"
            alert = self._spike_alert(index, suffix, values, count, start, end, severity, bool(improving))
            self._emit_alert(trainer, alert)

    def _spike_alert(
        self,
        index: int,
        suffix: str,
        values: dict[str, float],
        count: int,
        start: int,
        end: int,
        severity: str,
        improving: bool = False,
    ) -> Alert:
        step = int(values["worst_step"])
        norm, limit, ratio, coef = (values[k] for k in ("worst_norm", "worst_threshold", "worst_ratio", "worst_coef"))
        what = "scaled by" if self.mode != "agc" else "smallest unit factor"
        covered = f"step {start}" if start == end else f"steps {start}-{end}"
        finding = (
            f"{count} gradient spike{'s' if count > 1 else ''} in {covered}; the worst at step {step}: global norm "
            f"{norm:.4g}, {ratio:.3g}x the expected ceiling, clipped ({what} {coef:.3g})"
            + ("; the training loss keeps improving." if improving else ".")
        )
        return Alert(
            step=end,  # found at the end of the interval; it began at the first spike
            kind=AlertKind.GRADIENT_SPIKE,
            name=f"optimizer{index}" if suffix else "",
            value=norm,
            threshold=limit,
            message=alert_message(AlertKind.GRADIENT_SPIKE, finding, severity),
            severity=severity,  # type: ignore[arg-type]
            onset=int(values["first_spike_step"]),
            count=count,
        )

    # -- TensorBoard / state ---------------------------------------------------------------------------------
    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        return {
            "gradwatch: clipping": {
                "norm vs threshold": [
                    "Multiline",
                    [r"^gradwatch/clip/pre_clip_norm", r"^gradwatch/clip/threshold", r"^gradwatch/clip/ema_"],
                ],
                "clip coefficient": ["Multiline", [r"^gradwatch/clip/coefficient"]],
                "clipped fraction and spikes": [
                    "Multiline",
                    [r"^gradwatch/clip/clipped_fraction", r"^gradwatch/clip/spikes"],
                ],
            }
        }

    @override
    def _config(self) -> dict[str, Any]:
        return {"mode": self.mode, "norm_type": self.norm_type}

    @override
    def _extra_state(self) -> dict[str, Any]:
        saved: dict[str, Any] = {str(i): s for i, s in self._loaded.items()}
        for index, stats in self._stats.items():
            saved[str(index)] = {
                "statistics": stats.to_state(),
                "interval": self._intervals[index].to_state(),
                "interval_start": self._interval_start.get(index, 0),
            }
        return {"clip_state": saved}

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        self._stats.clear()
        self._intervals.clear()
        loaded = {int(i): dict(s) for i, s in state.get("clip_state", {}).items()}
        if changed:  # statistics of another rule or norm do not apply; the unreported spikes still do
            for s in loaded.values():
                s.pop("statistics", None)
        self._loaded = loaded
        return ["the clipping statistics (a new warm-up follows)"] if changed and loaded else []


def _make_rule(
    mode: str,
    z_threshold: float,
    warmup_steps: int,
    warmup_cap: float | None,
    initial_max_norm: float | None,
    quantile: float,
    history_size: int,
    clip_factor: float,
    agc_eps: float,
    agc_exclude: Any,
) -> ZScoreRule:
    """The rule of ``mode``; every argument is validated, whichever mode uses it."""
    start = (z_threshold, warmup_steps, warmup_cap, initial_max_norm)
    percentile = PercentileRule(*start, quantile, history_size)
    agc = AGCRule(*start, clip_factor, agc_eps, agc_exclude)
    return {"zscore": ZScoreRule(*start), "percentile": percentile, "agc": agc}[mode]
