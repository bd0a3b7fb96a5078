"""AdaptiveClipping's state and rules: what is learned from the norms (typed, checkpointed), what one logging
interval saw, and one small rule object per mode, each validating its own arguments.

On an accelerator everything here stays on the device: thresholds and coefficients are tensors built with
``torch.where``. On a CPU, where reading a value costs nothing, the scalar statistics are Python floats and the same
rules (:mod:`~lightning_gradwatch.functional.clipping` takes either) cost microseconds instead of a hundred tensor
operations per step. Checkpoints hold tensors either way.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gradwatch._validation import check_number, check_patterns
from lightning_gradwatch.core.state import DeclaredState, buffer, scalar
from lightning_gradwatch.functional._scalars import Flag, Scalar, as_float, div, minimum, where
from lightning_gradwatch.functional.clipping import agc_coefficients, ema_update, zscore_threshold
from lightning_gradwatch.functional.rings import ring_push, ring_quantile


@dataclass
class NormStatistics(DeclaredState):
    """What the run's gradient norms taught the clipper; saved in checkpoints, so a resumed run has no warm-up.

    The scalars are 0-dim tensors on the device, or floats on the host path (a CPU); the percentile rule's ring
    buffer is a tensor either way."""

    mean: Scalar = scalar()
    var: Scalar = scalar()
    count: Scalar = scalar()  # finite norms folded in
    total_clipped: Scalar = scalar()
    total_steps: Scalar = scalar()
    history: Tensor = buffer()  # the percentile rule's ring buffer (one slot in the other modes)
    history_count: Tensor = buffer(torch.int64)  # norms ever pushed into ``history``

    @classmethod
    def zeros(cls, device: torch.device, history_size: int, on_host: bool) -> NormStatistics:
        return cls.fresh(device, on_host, shapes={"history": (history_size,)})


@dataclass
class ClipInterval(DeclaredState):
    """What happened since the previous logging step: reported then, checkpointed meanwhile (a spike just before a
    checkpoint is still reported after a resume). Floats on the host path, 0-dim tensors on the device; reported
    as metrics and in alerts, and transferred, in the order declared."""

    steps: Scalar = scalar()
    clipped: Scalar = scalar()
    spikes: Scalar = scalar()
    first_spike_step: Scalar = scalar()
    worst_ratio: Scalar = scalar()
    worst_step: Scalar = scalar()
    worst_norm: Scalar = scalar()
    worst_threshold: Scalar = scalar()
    worst_coef: Scalar = scalar()
    last_norm: Scalar = scalar()
    last_threshold: Scalar = scalar()
    last_coefficient: Scalar = scalar()

    @classmethod
    def zeros(cls, device: torch.device, on_host: bool) -> ClipInterval:
        return cls.fresh(device, on_host)

    def record(
        self,
        step: int,
        norm: Scalar,
        valid: Flag,
        ceiling: Scalar,
        threshold: Scalar,
        coefficient: Scalar,
        ratio: float,
    ) -> None:
        """Fold one optimizer step in: clipped or not, and a spike (a norm ``ratio`` times the ceiling)."""
        self.steps = self.steps + 1
        self.clipped = self.clipped + as_float(valid & (coefficient < 1.0))
        relative = where(valid, div(norm, ceiling), 0.0)
        spike = relative >= ratio
        self.first_spike_step = where(spike & (self.spikes == 0), float(step), self.first_spike_step)
        self.spikes = self.spikes + as_float(spike)
        worse = spike & (relative > self.worst_ratio)
        self.worst_ratio = where(worse, relative, self.worst_ratio)
        self.worst_step = where(worse, float(step), self.worst_step)
        self.worst_norm = where(worse, norm, self.worst_norm)
        self.worst_threshold = where(worse, minimum(threshold, ceiling), self.worst_threshold)
        self.worst_coef = where(worse, coefficient, self.worst_coef)
        self.last_norm, self.last_threshold, self.last_coefficient = norm, threshold, coefficient


class ZScoreRule:
    """Clip a norm above ``mean + z * std`` of the EMA statistics, an outlier the farther it is the closer to the
    mean (ZClip's reciprocal scaling); a warm-up cap of ``warmup_cap`` times the mean until ``warmup_steps``, and
    before any statistics exist (the first finite step) the absolute ceiling ``initial_max_norm``."""

    mode = "zscore"

    def __init__(
        self, z_threshold: float, warmup_steps: int, warmup_cap: float | None, initial_max_norm: float | None = None
    ) -> None:
        self.z_threshold = check_number("z_threshold", z_threshold, gt=0)
        self.warmup_steps = check_number("warmup_steps", warmup_steps, ge=1, integer=True)
        self.warmup_cap = check_number("warmup_cap", warmup_cap, gt=1, optional=True)
        self.initial_max_norm = check_number("initial_max_norm", initial_max_norm, gt=0, optional=True)

    def _first(self, stats: NormStatistics, threshold: Scalar) -> Scalar:
        if self.initial_max_norm is None:
            return threshold
        return where(stats.count == 0, self.initial_max_norm, threshold)

    def ceiling(self, stats: NormStatistics) -> Scalar:
        """``mean + z * std`` (the warm-up cap before that, the initial ceiling before anything is known): what the
        statistics are fed at most, and the reference a spike is measured against, in every mode."""
        return self._first(
            stats,
            zscore_threshold(stats.mean, stats.var, stats.count, self.z_threshold, self.warmup_steps, self.warmup_cap),
        )

    def threshold(self, stats: NormStatistics, norm: Scalar) -> Scalar:
        """The norm this step's gradient is clipped to, if above it."""
        return self._first(
            stats,
            zscore_threshold(
                stats.mean, stats.var, stats.count, self.z_threshold, self.warmup_steps, self.warmup_cap, norm=norm
            ),
        )

    def fold(self, stats: NormStatistics, norm: Scalar, valid: Flag, decay: float, ceiling: Scalar) -> None:
        """Fold this step's norm into the statistics, capped at ``ceiling`` (:meth:`ceiling` before this step) so
        one spike cannot inflate them. A robust start: a warm-up norm ``warmup_cap`` times below the mean shows that
        the first norms were outliers (a blow-up at the first step), and the statistics start again from it instead
        of keeping them as the baseline."""
        capped = minimum(norm, ceiling)
        mean, var, count = ema_update(stats.mean, stats.var, stats.count, capped, decay, valid)
        if self.warmup_cap is not None:
            warming = (stats.count > 0) & (stats.count < self.warmup_steps)
            restart = valid & warming & (norm * self.warmup_cap < stats.mean)
            mean = where(restart, norm, mean)
            var = where(restart, 0.0, var)
            count = where(restart, 1.0, count)
        stats.mean, stats.var, stats.count = mean, var, count


class PercentileRule(ZScoreRule):
    """Clip to the ``quantile`` of the last ``history_size`` raw norms (a ring buffer on the device); the z-score
    rule covers the warm-up."""

    mode = "percentile"

    def __init__(
        self,
        z_threshold: float,
        warmup_steps: int,
        warmup_cap: float | None,
        initial_max_norm: float | None,
        quantile: float,
        history_size: int,
    ) -> None:
        super().__init__(z_threshold, warmup_steps, warmup_cap, initial_max_norm)
        self.quantile = check_number("quantile", quantile, gt=0, le=1)
        self.history_size = check_number("history_size", history_size, ge=1, integer=True)

    def threshold(self, stats: NormStatistics, norm: Scalar) -> Scalar:
        if stats.on_host:
            if int(stats.history_count) < self.warmup_steps:
                return self.ceiling(stats)
            return float(ring_quantile(stats.history, stats.history_count, self.quantile))
        quantile = ring_quantile(stats.history, stats.history_count, self.quantile)
        return torch.where(stats.history_count >= self.warmup_steps, quantile, self.ceiling(stats))

    @staticmethod
    def push(stats: NormStatistics, norm: Scalar, valid: Flag) -> None:
        # raw norms: one spike moves a quantile by one rank; clipped values would ratchet the threshold down
        if stats.on_host:
            if valid:
                stats.history[int(stats.history_count) % stats.history.numel()] = norm
                stats.history_count = stats.history_count + 1
            return
        stats.history, stats.history_count = ring_push(stats.history, stats.history_count, norm, valid)  # type: ignore[arg-type]


class AGCRule(ZScoreRule):
    """Adaptive Gradient Clipping, unit-wise: ``||G_unit|| <= clip_factor * max(||W_unit||, eps)`` for each row of
    every weight of 2+ dimensions except ``exclude``; the z-score rule stays on as the backstop for the rest."""

    mode = "agc"

    def __init__(
        self,
        z_threshold: float,
        warmup_steps: int,
        warmup_cap: float | None,
        initial_max_norm: float | None,
        clip_factor: float,
        eps: float,
        exclude: Any,
    ) -> None:
        super().__init__(z_threshold, warmup_steps, warmup_cap, initial_max_norm)
        self.clip_factor = check_number("clip_factor", clip_factor, gt=0)
        self.eps = check_number("agc_eps", eps, gt=0)
        self.exclude = check_patterns("agc_exclude", exclude, optional=True)

    def unit_clipped(self, params: list[torch.nn.Parameter], names: list[str]) -> list[bool]:
        """Which parameters AGC clips: 2+ dimensional ones, minus the output layer (or ``exclude``'s patterns)."""
        multi = [p.dim() >= 2 for p in params]
        if self.exclude is None:
            last = max((i for i, m in enumerate(multi) if m), default=None)
            return [m and i != last for i, m in enumerate(multi)]
        return [
            m and not any(fnmatch.fnmatchcase(n, pat) for pat in self.exclude)
            for m, n in zip(multi, names, strict=True)
        ]

    def clip_units(self, weights: list[Tensor], grads: list[Tensor], unscale: Tensor | None, valid: Flag) -> Scalar:
        """Clip each unit in place; returns the smallest unit factor (for the logs). With a bool ``valid`` (the
        host path), units are multiplied only when some unit clips."""
        if not grads:
            return 1.0 if isinstance(valid, bool) else torch.ones((), device=valid.device)
        coefficients, max_ratio = agc_coefficients(weights, grads, self.clip_factor, self.eps, grad_scale=unscale)
        if isinstance(valid, bool):
            ratio = float(max_ratio)
            if valid and ratio > 1.0:
                for g, c in zip(grads, coefficients, strict=True):
                    g.mul_(c)
            return 1.0 / ratio if valid and math.isfinite(ratio) and ratio > 1.0 else 1.0
        for g, c in zip(grads, coefficients, strict=True):
            g.mul_(torch.where(valid, c, torch.ones_like(c)))
        smallest = torch.where(torch.isfinite(max_ratio), max_ratio.clamp_min(1.0).reciprocal(), 1.0)
        return torch.where(valid, smallest, torch.ones_like(smallest))
