"""AdaptiveClipping's state and rules: what is learned from the norms (typed, checkpointed), what one logging
interval saw, and one small rule object per mode, each validating its own arguments.

Everything here stays on the device: thresholds and coefficients are tensors built with ``torch.where``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_gradwatch._validation import check_number, check_patterns
from lightning_gradwatch.functional.clipping import (
    agc_coefficients,
    ema_update,
    ring_push,
    ring_quantile,
    zscore_threshold,
)


def _zeros(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None) -> Tensor:
    return torch.zeros(() if size is None else (size,), dtype=dtype, device=device)


@dataclass
class NormStatistics:
    """What the run's gradient norms taught the clipper; saved in checkpoints, so a resumed run has no warm-up."""

    mean: Tensor
    var: Tensor
    count: Tensor  # finite norms folded in
    history: Tensor  # the percentile rule's ring buffer (one slot in the other modes)
    history_count: Tensor  # int64: norms ever pushed into ``history``
    total_clipped: Tensor
    total_steps: Tensor

    @classmethod
    def zeros(cls, device: torch.device, history_size: int) -> NormStatistics:
        return cls(
            mean=_zeros(device),
            var=_zeros(device),
            count=_zeros(device),
            history=_zeros(device, size=history_size),
            history_count=_zeros(device, torch.int64),
            total_clipped=_zeros(device),
            total_steps=_zeros(device),
        )

    def to(self, device: torch.device) -> NormStatistics:
        return NormStatistics(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def to_state(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name).detach().cpu().clone() for f in dataclasses.fields(self)}

    def load(self, state: dict[str, Tensor]) -> None:
        """Adopt a checkpoint's values where they fit this configuration (the ring buffer's size may differ)."""
        for f in dataclasses.fields(self):
            current, saved = getattr(self, f.name), state.get(f.name)
            if isinstance(saved, Tensor) and saved.shape == current.shape:
                setattr(self, f.name, saved.to(device=current.device, dtype=current.dtype))


@dataclass
class ClipInterval:
    """What happened since the previous logging step: reported then, checkpointed meanwhile (a spike just before a
    checkpoint is still reported after a resume)."""

    steps: Tensor
    clipped: Tensor
    spikes: Tensor
    first_spike_step: Tensor
    worst_ratio: Tensor
    worst_step: Tensor
    worst_norm: Tensor
    worst_threshold: Tensor
    worst_coef: Tensor
    last_norm: Tensor
    last_threshold: Tensor
    last_coefficient: Tensor
    #: keys reported as metrics and in alerts, in the order they are transferred
    REPORTED: ClassVar[tuple[str, ...]] = (
        "steps",
        "clipped",
        "spikes",
        "first_spike_step",
        "worst_ratio",
        "worst_step",
        "worst_norm",
        "worst_threshold",
        "worst_coef",
        "last_norm",
        "last_threshold",
        "last_coefficient",
    )

    @classmethod
    def zeros(cls, device: torch.device) -> ClipInterval:
        return cls(**{f.name: _zeros(device) for f in dataclasses.fields(cls)})

    def to(self, device: torch.device) -> ClipInterval:
        return ClipInterval(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def to_state(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name).detach().cpu().clone() for f in dataclasses.fields(self)}

    def load(self, state: dict[str, Tensor]) -> None:
        for f in dataclasses.fields(self):
            saved = state.get(f.name)
            if isinstance(saved, Tensor) and saved.numel() == 1:
                setattr(self, f.name, saved.reshape(()).to(getattr(self, f.name)))

    def record(
        self,
        step: int,
        norm: Tensor,
        valid: Tensor,
        ceiling: Tensor,
        threshold: Tensor,
        coefficient: Tensor,
        ratio: float,
    ) -> None:
        """Fold one optimizer step in: clipped or not, and a spike (a norm ``ratio`` times the ceiling)."""
        self.steps = self.steps + 1
        self.clipped = self.clipped + (valid & (coefficient < 1.0)).float()
        relative = torch.where(valid, norm / ceiling, torch.zeros_like(norm))
        spike = relative >= ratio
        self.first_spike_step = torch.where(spike & (self.spikes == 0), float(step), self.first_spike_step)
        self.spikes = self.spikes + spike.float()
        worse = spike & (relative > self.worst_ratio)
        self.worst_ratio = torch.where(worse, relative, self.worst_ratio)
        self.worst_step = torch.where(worse, float(step), self.worst_step)
        self.worst_norm = torch.where(worse, norm, self.worst_norm)
        self.worst_threshold = torch.where(worse, torch.minimum(threshold, ceiling), self.worst_threshold)
        self.worst_coef = torch.where(worse, coefficient, self.worst_coef)
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

    def _first(self, stats: NormStatistics, threshold: Tensor) -> Tensor:
        if self.initial_max_norm is None:
            return threshold
        return torch.where(stats.count == 0, torch.full_like(threshold, self.initial_max_norm), threshold)

    def ceiling(self, stats: NormStatistics) -> Tensor:
        """``mean + z * std`` (the warm-up cap before that, the initial ceiling before anything is known): what the
        statistics are fed at most, and the reference a spike is measured against, in every mode."""
        return self._first(
            stats,
            zscore_threshold(stats.mean, stats.var, stats.count, self.z_threshold, self.warmup_steps, self.warmup_cap),
        )

    def threshold(self, stats: NormStatistics, norm: Tensor) -> Tensor:
        """The norm this step's gradient is clipped to, if above it."""
        return self._first(
            stats,
            zscore_threshold(
                stats.mean, stats.var, stats.count, self.z_threshold, self.warmup_steps, self.warmup_cap, norm=norm
            ),
        )

    def fold(self, stats: NormStatistics, norm: Tensor, valid: Tensor, decay: float) -> None:
        """Fold this step's norm into the statistics, capped at :meth:`ceiling` so one spike cannot inflate them. A
        robust start: a warm-up norm ``warmup_cap`` times below the mean shows that the first norms were outliers (a
        blow-up at the first step), and the statistics start again from it instead of keeping them as the baseline."""
        capped = torch.minimum(norm, self.ceiling(stats))
        mean, var, count = ema_update(stats.mean, stats.var, stats.count, capped, decay, valid)
        if self.warmup_cap is not None:
            warming = (stats.count > 0) & (stats.count < self.warmup_steps)
            restart = valid & warming & (norm * self.warmup_cap < stats.mean)
            mean = torch.where(restart, norm, mean)
            var = torch.where(restart, torch.zeros_like(var), var)
            count = torch.where(restart, torch.ones_like(count), count)
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

    def threshold(self, stats: NormStatistics, norm: Tensor) -> Tensor:
        quantile = ring_quantile(stats.history, stats.history_count, self.quantile)
        return torch.where(stats.history_count >= self.warmup_steps, quantile, self.ceiling(stats))

    @staticmethod
    def push(stats: NormStatistics, norm: Tensor, valid: Tensor) -> None:
        # raw norms: one spike moves a quantile by one rank; clipped values would ratchet the threshold down
        stats.history, stats.history_count = ring_push(stats.history, stats.history_count, norm, valid)


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

    def clip_units(
        self, weights: list[Tensor], grads: list[Tensor], unscale: Tensor | None, valid: Tensor, on_host: bool
    ) -> Tensor:
        """Clip each unit in place; returns the smallest unit factor (for the logs)."""
        if not grads:
            return torch.ones((), device=valid.device)
        coefficients, max_ratio = agc_coefficients(weights, grads, self.clip_factor, self.eps, grad_scale=unscale)
        if not (on_host and not (bool(valid) and float(max_ratio) > 1.0)):  # on a CPU, skip when nothing clips
            for g, c in zip(grads, coefficients, strict=True):
                g.mul_(torch.where(valid, c, torch.ones_like(c)))
        smallest = torch.where(torch.isfinite(max_ratio), max_ratio.clamp_min(1.0).reciprocal(), 1.0)
        return torch.where(valid, smallest, torch.ones_like(smallest))
