"""GradientNormLogger's diagnoses, decided on the host from one logging step's reading.

- Exploding: the largest global norm since the previous logging step (tracked on the device every step, so a blow-up
  between logging steps is seen, with the step it happened) against an absolute ceiling and against the median of
  the norms logged before. One step far out is worth knowing (``info``); a warning needs evidence of harm: the norm
  still high at the logging step, again in the next interval, or a single step so far out (``catastrophic_factor``
  times the threshold) that it wrecks the weights by itself.
- Vanishing: a decay with depth. An early layer's gradient magnitude per active element (zeros of unused rows,
  such as an embedding's, left out) against the layers nearest the loss (the last quarter), not the network's
  median, which in a deep plain network is itself small.
- Stopped: a layer whose gradient was non-zero once and has been exactly zero on every step for ``stop_after``
  steps: the network collapsed behind it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from lightning_gradwatch.alerts import AlertKind


@dataclass(frozen=True)
class GradientReading:
    """One logging step, on the host: the layers with a gradient, in model order."""

    step: int
    names: list[str]
    norms: list[float]
    active_rms: list[float]  # norm / sqrt(non-zero elements); 0.0 when the layer's gradient is exactly zero
    silent_steps: list[int]  # steps since the layer's gradient was last non-zero; -1 if it never was
    global_norm: float
    peak: float  # the largest finite global norm since the previous logging step
    peak_step: int
    norm_label: str  # the p of the norm, for messages


@dataclass(frozen=True)
class Verdict:
    """One rule's finding: ``key`` identifies the condition (alerted once per onset)."""

    kind: str
    key: str
    name: str
    value: float
    threshold: float
    finding: str
    severity: str = "warning"
    onset: int | None = None


class ExplodingRule:
    """Absolute ceiling and jump against the recent median, on the interval's peak."""

    def __init__(
        self, threshold: float | None, factor: float | None, history_size: int, catastrophic_factor: float = 100.0
    ) -> None:
        self.threshold, self.factor, self.history_size = threshold, factor, history_size
        self.catastrophic_factor = catastrophic_factor
        self.history: list[float] = []
        self._fired_last = False

    def check(self, r: GradientReading, largest: str) -> Verdict | None:
        median = statistics.median(self.history) if len(self.history) >= 5 else None
        limit, reason = None, ""
        if self.threshold is not None and r.peak > self.threshold:
            limit, reason = self.threshold, f"is above the threshold {self.threshold:g}"
        elif self.factor is not None and median is not None and median > 0 and r.peak > self.factor * median:
            limit, reason = self.factor * median, f"jumped to {r.peak / median:.3g}x its recent median {median:.3g}"
        fired_before, self._fired_last = self._fired_last, limit is not None
        if math.isfinite(r.global_norm):
            self.history.append(r.global_norm)
            del self.history[: -self.history_size]
        if limit is None:
            return None
        sustained = r.global_norm > limit or fired_before
        catastrophic = r.peak > self.catastrophic_factor * limit
        severity = "warning" if sustained or catastrophic else "info"
        when = f"step {r.peak_step}" + ("" if r.peak_step == r.step else f" (found at step {r.step})")
        how = (
            "it stays high"
            if sustained
            else "one step this far out wrecks the weights unless it is clipped"
            if catastrophic
            else f"a single step; back to {r.global_norm:.3g} by step {r.step}"
        )
        finding = (
            f"Exploding gradients at {when}: the global {r.norm_label}-norm {r.peak:.4g} {reason} ({how}); the "
            f"largest layer norm at step {r.step} is in '{largest}'."
        )
        onset = r.peak_step if r.peak_step < r.step else None
        return Verdict(AlertKind.EXPLODING_GRADIENT, "", largest, r.peak, limit, finding, severity, onset)

    def state(self) -> list[float]:
        return list(self.history)


class VanishingRule:
    """An early layer whose active gradient magnitude is a tiny fraction of the layers' nearest the loss."""

    def __init__(self, threshold: float | None, ratio: float) -> None:
        self.threshold, self.ratio = threshold, ratio

    def check(self, r: GradientReading) -> Verdict | None:
        layers = [(n, m) for n, m in zip(r.names, r.active_rms, strict=True) if m > 0 and math.isfinite(m)]
        if self.threshold is None or len(layers) < 2:
            return None
        nearest_loss = statistics.median(m for _, m in layers[-math.ceil(len(layers) / 4) :])
        early = layers[: math.ceil(len(layers) / 2)]
        offending = [(n, m) for n, m in early if m < self.threshold and m < self.ratio * nearest_loss]
        if not offending:
            return None
        name, value = offending[0]
        finding = (
            f"Vanishing gradients at step {r.step}: layer '{name}' has a gradient magnitude of {value:.3g} per active "
            f"element, {value / nearest_loss:.2g}x that of the layers nearest the loss ({nearest_loss:.3g}); "
            f"{len(offending)} of the first {len(early)} layers are affected."
        )
        return Verdict(AlertKind.VANISHING_GRADIENT, "", name, value, self.threshold, finding)


class StoppedRule:
    """Layers whose gradient used to be non-zero and has been exactly zero on every step for ``stop_after`` steps."""

    def __init__(self, stop_after: int | None) -> None:
        self.stop_after = stop_after

    def check(self, r: GradientReading) -> list[Verdict]:
        if self.stop_after is None:
            return []
        stopped = [(n, s) for n, s in zip(r.names, r.silent_steps, strict=True) if s >= self.stop_after]
        verdicts = []
        for name, silent in stopped:
            since = r.step - silent + 1
            finding = (
                f"Layer '{name}' stopped learning at step {since}: its gradient has been exactly zero on every step "
                f"since ({silent} steps), after being non-zero before; {len(stopped)} of {len(r.names)} layers stopped."
            )
            verdicts.append(
                Verdict(
                    AlertKind.STOPPED_LAYER, name, name, float(silent), float(self.stop_after), finding, onset=since
                )
            )
        return verdicts
