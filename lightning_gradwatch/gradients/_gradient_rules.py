"""GradientNormLogger's diagnoses, decided on the host from one logging step's reading.

- Exploding: the largest global norm since the previous logging step (tracked on the device every step, so a blow-up
  between logging steps is seen, with the step it happened) against an absolute ceiling and against the median of
  the norms logged before. One step far out is worth knowing (``info``); a warning needs evidence of harm: the norm
  still high at the logging step, again in the next interval, or a single step so far out (``catastrophic_factor``
  times the threshold) that it wrecks the weights by itself.
- Vanishing: a decay with depth. The first layer's gradient magnitude per active element (zeros of unused rows,
  such as an embedding's, left out) against the layers nearest the loss (the last quarter), not the network's
  median, which in a deep plain network is itself small.
- Stopped: a layer whose gradient was non-zero once and has been exactly zero on every step for ``stop_after``
  steps: the network collapsed behind it.
- Update-to-weight ratio: far above the healthy band (around 1e-3) at consecutive logging steps, the learning rate
  is too high; exactly zero while the layer has a gradient, the layer is frozen.
- Underflow (fp16): a layer's fraction of exactly-zero gradient elements jumps while the loss scale has fallen far
  below its best; or, with fp16 gradients and no loss scaling at all, most of a layer's gradient elements are
  exactly zero: small gradients flush to zero in half precision.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lightning_gradwatch.alerts import Alert, AlertKind, alert_message


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
    zero_fraction: list[float] | None = None  # exactly-zero gradient elements per layer
    update_ratios: list[float] | None = None  # the previous step's ||delta w|| / ||w|| per layer, when measured
    loss_scale: float | None = None  # the GradScaler's scale (16-mixed)
    loss_improving: bool | None = None  # the training loss fell over the last steps (None: unknown)
    half_unscaled: bool = False  # fp16 gradients without a GradScaler (16-true, or a model cast to half)


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

    def alert(self, step: int) -> Alert:
        message = alert_message(self.kind, self.finding, self.severity)
        return Alert(step, self.kind, self.name, self.value, self.threshold, message, self.severity, self.onset)  # type: ignore[arg-type]


class ExplodingRule:
    """Absolute ceiling and jump against the recent median, on the interval's peak.

    Severity: above the absolute ceiling, a warning when the norm stays there at the logging step or one step is
    ``catastrophic_factor`` times past it. A jump against the median is a warning only when the norm keeps growing
    (past the limit at two logging steps in a row, ``growth`` times higher the second time): a one-step transient
    or a level shift as a run leaves a plateau, both common in healthy runs, are ``info``.
    """

    def __init__(
        self,
        threshold: float | None,
        factor: float | None,
        history_size: int,
        catastrophic_factor: float = 100.0,
        growth: float = 1.5,
    ) -> None:
        self.threshold, self.factor, self.history_size = threshold, factor, history_size
        self.catastrophic_factor, self.growth = catastrophic_factor, growth
        self.history: list[float] = []
        self._fired_last = False

    def check(self, r: GradientReading, largest: str) -> Verdict | None:
        median = statistics.median(self.history) if len(self.history) >= 5 else None
        previous = self.history[-1] if self.history else math.nan
        limit, reason, absolute = None, "", False
        if self.threshold is not None and r.peak > self.threshold:
            limit, reason, absolute = self.threshold, f"is above the threshold {self.threshold:g}", True
        elif self.factor is not None and median is not None and median > 0 and r.peak > self.factor * median:
            limit, reason = self.factor * median, f"jumped to {r.peak / median:.3g}x its recent median {median:.3g}"
        fired_before, self._fired_last = self._fired_last, limit is not None
        if math.isfinite(r.global_norm):
            self.history.append(r.global_norm)
            del self.history[: -self.history_size]
        if limit is None:
            return None
        catastrophic = r.peak > self.catastrophic_factor * limit
        if absolute:
            harmful = r.global_norm > limit or catastrophic
        else:
            harmful = fired_before and r.global_norm > limit and r.global_norm >= self.growth * previous
        when = f"step {r.peak_step}" + ("" if r.peak_step == r.step else f" (found at step {r.step})")
        if r.loss_improving and math.isfinite(r.global_norm):
            # a fine-tune's norm grows as its loss falls, a run leaving a plateau jumps: growth that hurts nothing
            how = "while the training loss keeps improving: worth watching, nothing to fix yet"
            harmful = False
        elif catastrophic:
            how = "one step this far out wrecks the weights unless it is clipped"
        elif harmful:
            how = "it stays high" if absolute else "and keeps growing"
        elif r.global_norm > limit:
            how = f"a level shift: {r.global_norm:.3g} at step {r.step}, not growing so far"
        else:
            how = f"a single step; back to {r.global_norm:.3g} by step {r.step}"
        finding = (
            f"Exploding gradients at {when}: the global {r.norm_label}-norm {r.peak:.4g} {reason} ({how}); the "
            f"largest layer norm at step {r.step} is in '{largest}'."
        )
        onset = r.peak_step if r.peak_step < r.step else None
        severity = "warning" if harmful else "info"
        return Verdict(AlertKind.EXPLODING_GRADIENT, severity, largest, r.peak, limit, finding, severity, onset)

    def state(self) -> list[float]:
        return list(self.history)


class VanishingRule:
    """The first layer's active gradient magnitude a tiny fraction of that of the layers nearest the loss.

    Only the first layer is judged: in a network with residual paths some inner layers legitimately get tiny
    gradients (layer scale in ConvNeXt, a transformer's first query weights at initialisation), while the input end
    of the main path does not; vanishing with depth shows there first.
    """

    def __init__(self, threshold: float | None, ratio: float) -> None:
        self.threshold, self.ratio = threshold, ratio

    def check(self, r: GradientReading) -> Verdict | None:
        layers = [(n, m) for n, m in zip(r.names, r.active_rms, strict=True) if m > 0 and math.isfinite(m)]
        if self.threshold is None or len(layers) < 2:
            return None
        nearest_loss = statistics.median(m for _, m in layers[-math.ceil(len(layers) / 4) :])
        name, value = layers[0]
        if not (value < self.threshold and value < self.ratio * nearest_loss):
            return None
        early = layers[: math.ceil(len(layers) / 2)]
        below = sum(m < self.ratio * nearest_loss for _, m in early)
        # the extreme of vanishing: the layers before it get a gradient that underflows to exactly 0 in float,
        # while the first non-zero one is already tiny (a healthy first non-zero layer after zeros is a cut-off
        # path, dead units or a detach, not vanishing)
        zeros = r.names[: r.names.index(name)]
        if zeros:
            never = sum(s == -1 for s in r.silent_steps[: len(zeros)])
            finding = (
                f"Vanishing gradients at step {r.step}: the gradients of the first {len(zeros)} layers ('{zeros[0]}' "
                f"to '{zeros[-1]}') underflow to exactly 0 ({never} of them have never been anything else); the first layer with a "
                f"non-zero gradient, '{name}', has {value:.3g} per active element, {value / nearest_loss:.2g}x that of "
                f"the layers nearest the loss ({nearest_loss:.3g})."
            )
            return Verdict(AlertKind.VANISHING_GRADIENT, "", zeros[0], 0.0, self.threshold, finding)
        finding = (
            f"Vanishing gradients at step {r.step}: the first layer '{name}' has a gradient magnitude of {value:.3g} "
            f"per active element, {value / nearest_loss:.2g}x that of the layers nearest the loss ({nearest_loss:.3g}); "
            f"{below} of the first {len(early)} layers are below {self.ratio:g}x."
        )
        return Verdict(AlertKind.VANISHING_GRADIENT, "", name, value, self.threshold, finding)

    def below(self, r: GradientReading) -> set[str]:
        """The layers whose gradient magnitude is below the threshold (exact zeros included): where it vanished."""
        if self.threshold is None:
            return set()
        return {n for n, m in zip(r.names, r.active_rms, strict=True) if m < self.threshold}


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


class UpdateRatioRule:
    """Update-to-weight ratios out of their healthy band at ``consecutive`` logging steps in a row spanning at least
    ``span`` optimizer steps (the first steps of a run move fast): the median over the layers above ``high`` (one
    alert for the model, naming the layer moving most: ``info``, a ``warning`` above ``severe_factor`` times
    ``high``), or a layer's ratio exactly zero while it has a gradient (one warning per frozen layer)."""

    def __init__(self, high: float | None, consecutive: int = 3, span: int = 100, severe_factor: float = 5.0) -> None:
        self.high, self.consecutive, self.span, self.severe_factor = high, consecutive, span, severe_factor
        self._high_since: tuple[int, int] | None = None  # (first step, logging steps) of the current streak
        self._frozen_since: dict[str, tuple[int, int]] = {}

    def _streak(self, since: tuple[int, int] | None, holds: bool, step: int) -> tuple[tuple[int, int] | None, bool]:
        if not holds:
            return None, False
        first, count = since if since is not None else (step, 0)
        return (first, count + 1), count + 1 >= self.consecutive and step - first >= self.span

    def check(self, r: GradientReading) -> list[Verdict]:
        if r.update_ratios is None:
            return []
        verdicts = []
        layers = list(zip(r.names, r.update_ratios, r.active_rms, strict=True))
        if self.high is not None:
            median = statistics.median(u for _, u, _ in layers)
            self._high_since, lasting = self._streak(self._high_since, median > self.high, r.step)
            if lasting:
                name, ratio, _ = max(layers, key=lambda item: item[1])
                # some standard recipes run hot (plain SGD at lr 20 with clipping): worth knowing; far above, a warning
                severe = median > self.severe_factor * self.high
                finding = (
                    f"Updates {'far too' if severe else 'very'} large at step {r.step}: the layers move by "
                    f"{median:.3g} of their weights per step (median over layers; healthy is about 1e-3), above "
                    f"{self.high:g} since step {self._high_since[0] if self._high_since else r.step}; '{name}' the "
                    f"most ({ratio:.3g}). "
                    + (
                        "The learning rate is too high: the run is about to diverge."
                        if severe
                        else "If the loss stalls or spikes, the learning rate is too high."
                    )
                )
                key, severity = ("high severe", "warning") if severe else ("high", "info")
                verdicts.append(Verdict(AlertKind.UPDATE_RATIO, key, name, median, self.high, finding, severity))
        for name, ratio, rms in layers:
            since, lasting = self._streak(self._frozen_since.get(name), ratio == 0 and rms > 0, r.step)
            self._frozen_since.pop(name, None) if since is None else self._frozen_since.__setitem__(name, since)
            if lasting:
                finding = (
                    f"Layer '{name}' does not move at step {r.step}: its weights have not changed over an update since "
                    f"step {since[0] if since else r.step} although it has a gradient (a learning rate of 0 in its "
                    "parameter group, or its updates are dropped). If it should learn, check the optimizer's "
                    "parameter groups and the learning-rate schedule."
                )
                verdicts.append(Verdict(AlertKind.UPDATE_RATIO, f"frozen {name}", name, 0.0, 0.0, finding))
        return verdicts


class UnderflowRule:
    """fp16: a layer's exactly-zero fraction jumps by ``jump`` since the previous logging step while the loss scale
    is ``scale_drop`` times below the largest seen."""

    def __init__(self, jump: float = 0.2, scale_drop: float = 256.0, unscaled_zeros: float = 0.5) -> None:
        self.jump, self.scale_drop, self.unscaled_zeros = jump, scale_drop, unscaled_zeros
        self._previous: dict[str, float] = {}
        self._best_scale = 0.0

    def check(self, r: GradientReading) -> list[Verdict]:
        if r.zero_fraction is not None and r.half_unscaled:
            return self._unscaled(r)
        if r.zero_fraction is None or r.loss_scale is None:
            return []
        self._best_scale = max(self._best_scale, r.loss_scale)
        low = r.loss_scale * self.scale_drop <= self._best_scale
        verdicts = []
        for name, zeros in zip(r.names, r.zero_fraction, strict=True):
            before = self._previous.get(name)
            self._previous[name] = zeros
            if low and before is not None and zeros >= before + self.jump:
                finding = (
                    f"Gradient underflow in '{name}' at step {r.step}: {zeros:.0%} of its gradient elements are exactly "
                    f"zero, up from {before:.0%}, while the fp16 loss scale fell to {r.loss_scale:g} (it was "
                    f"{self._best_scale:g}): small gradients flush to zero in half precision."
                )
                verdicts.append(Verdict(AlertKind.GRADIENT_UNDERFLOW, name, name, zeros, before + self.jump, finding))
        return verdicts

    def _unscaled(self, r: GradientReading) -> list[Verdict]:
        """fp16 without loss scaling: nothing keeps small gradients above half precision's smallest numbers, so
        the layers where most gradient elements are exactly zero have lost them (one alert, for the worst)."""
        assert r.zero_fraction is not None
        flushed = [(z, n) for n, z in zip(r.names, r.zero_fraction, strict=True) if z >= self.unscaled_zeros]
        if not flushed:
            return []
        zeros, name = max(flushed)
        finding = (
            f"Gradient underflow at step {r.step}: the gradients are float16 and nothing scales the loss (precision "
            f"'16-true' or a model cast to half), and {len(flushed)} of {len(r.names)} layers have most of their "
            f"gradient elements exactly zero ('{name}': {zeros:.0%}): small gradients flush to zero in half precision. "
            "Use precision='16-mixed' (float32 weights with a GradScaler) or bf16."
        )
        return [Verdict(AlertKind.GRADIENT_UNDERFLOW, "unscaled", name, zeros, self.unscaled_zeros, finding)]


@dataclass
class IntervalTally:
    """What the rules need from the steps between two logging steps, kept where deciding is free: on the device
    (no sync per step), or on the host as Python floats on a CPU (no tensor op per step)."""

    peak: Tensor | float  # the largest finite global norm
    peak_step: Tensor | float
    last_nonzero: Tensor | list[float]  # per layer: the last step its gradient was non-zero (-1: never); kept

    @classmethod
    def zeros(
        cls,
        layers: int,
        device: torch.device,
        last_nonzero: Tensor | list[float] | None = None,
        on_host: bool = False,
    ) -> IntervalTally:
        if on_host:
            start = [-1.0] * layers if last_nonzero is None else _floats(last_nonzero)
            return cls(0.0, 0.0, start)
        zero = torch.zeros((), device=device)
        start_t = torch.full((layers,), -1.0, device=device) if last_nonzero is None else _tensor(last_nonzero, device)
        return cls(zero, zero.clone(), start_t)

    @property
    def on_host(self) -> bool:
        return isinstance(self.last_nonzero, list)

    @property
    def layers(self) -> int:
        return len(self.last_nonzero) if isinstance(self.last_nonzero, list) else self.last_nonzero.numel()

    def fold(self, step: int, global_norm: Tensor, layer_norms: Tensor, overflow: Tensor) -> None:
        """One step on the device: ``layer_norms`` per layer, ``overflow`` 1.0 on a step the GradScaler skips."""
        assert isinstance(self.last_nonzero, Tensor)
        valid = torch.isfinite(global_norm) & (overflow == 0)
        higher = valid & (global_norm > self.peak)
        self.peak = torch.where(higher, global_norm, self.peak)
        self.peak_step = torch.where(higher, float(step), self.peak_step)
        self.last_nonzero = torch.where(valid & (layer_norms > 0), float(step), self.last_nonzero)

    def fold_on_host(
        self, step: int, global_norm: float, param_norms: list[float], layer_of_param: list[int], overflow: bool
    ) -> None:
        """The same step on the host, from per-parameter norms: a layer is non-zero when any of its parameters is
        (a p-norm is zero only when every element is)."""
        assert isinstance(self.last_nonzero, list)
        if overflow or not math.isfinite(global_norm):
            return
        if global_norm > float(self.peak):
            self.peak, self.peak_step = global_norm, float(step)
        for layer, norm in zip(layer_of_param, param_norms, strict=True):
            if norm > 0:
                self.last_nonzero[layer] = float(step)

    def state(self) -> dict[str, Any]:
        """Plain values for a checkpoint (a host read on the device path: only when saving)."""
        peak, peak_step, last = self.tensors(torch.device("cpu"))
        return {"peak": float(peak), "peak_step": float(peak_step), "last_nonzero": last.tolist()}

    @classmethod
    def restored(cls, state: dict[str, Any], device: torch.device, on_host: bool) -> IntervalTally:
        last = [float(v) for v in state["last_nonzero"]]
        tally = cls.zeros(len(last), device, last, on_host)
        if on_host:
            tally.peak, tally.peak_step = float(state["peak"]), float(state["peak_step"])
        else:
            tally.peak = torch.tensor(float(state["peak"]), device=device)
            tally.peak_step = torch.tensor(float(state["peak_step"]), device=device)
        return tally

    def last_nonzero_steps(self) -> list[float]:
        """``last_nonzero`` on the host (a transfer on the device path: only when the layers change)."""
        return _floats(self.last_nonzero)

    def tensors(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``peak``, ``peak_step`` and ``last_nonzero`` as tensors, for the logging step's one transfer."""
        return _tensor(self.peak, device), _tensor(self.peak_step, device), _tensor(self.last_nonzero, device)


def _tensor(value: Tensor | float | list[float], device: torch.device) -> Tensor:
    return value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float32, device=device)


def _floats(value: Tensor | list[float]) -> list[float]:
    return value.tolist() if isinstance(value, Tensor) else list(value)


@dataclass
class Diagnosis:
    """Every rule of one optimizer, and the conditions they fire: ``(kind, key, verdict or None)``, every condition
    listed (a condition not firing is cleared)."""

    exploding: ExplodingRule
    vanishing: VanishingRule
    stopped: StoppedRule
    updates: UpdateRatioRule
    underflow: UnderflowRule

    def check(self, r: GradientReading) -> list[tuple[str, str, Verdict | None]]:
        largest = r.names[max(range(len(r.norms)), key=r.norms.__getitem__)]
        out: list[tuple[str, str, Verdict | None]] = []
        exploding = self.exploding.check(r, largest)
        if exploding is None or exploding.key == "info":
            out.append((AlertKind.EXPLODING_GRADIENT, "|info", exploding))
        # a warning supersedes the info of the same episode: the info condition stays as it was
        out.append(
            (AlertKind.EXPLODING_GRADIENT, "|warning", exploding if exploding and exploding.key == "warning" else None)
        )
        vanishing = self.vanishing.check(r)
        updates = self.updates.check(r)
        if vanishing is not None:
            # a layer whose gradient vanished does not move either: one cause, one problem, not one per layer
            vanished = self.vanishing.below(r)
            still = [v for v in updates if v.key.startswith("frozen ") and v.name in vanished]
            updates = [v for v in updates if v not in still]
            if still:
                names = ", ".join(f"'{v.name}'" for v in still[:6]) + (
                    f" and {len(still) - 6} more" if len(still) > 6 else ""
                )
                finding = f"{vanishing.finding} {len(still)} of them no longer move at all: {names}."
                vanishing = replace(vanishing, finding=finding)
        out.append((AlertKind.VANISHING_GRADIENT, "", vanishing))
        stopped, underflow = self.stopped.check(r), self.underflow.check(r)
        unscaled = next((v for v in underflow if v.key == "unscaled"), None)
        if unscaled is not None:  # layers whose gradient flushed to zero in fp16 stop: the same problem
            flushed = {n for n, z in zip(r.names, r.zero_fraction or [], strict=True) if z >= 0.5}
            also = [v.name for v in stopped if v.name in flushed]
            stopped = [v for v in stopped if v.name not in flushed]
            if also:
                names = ", ".join(f"'{n}'" for n in also)
                underflow = [replace(unscaled, finding=f"{unscaled.finding} Stopped by it: {names}.")] + [
                    v for v in underflow if v is not unscaled
                ]
        found = {(v.kind, v.key): v for v in stopped + updates + underflow}
        keys = [(AlertKind.STOPPED_LAYER, n) for n in r.names]
        keys += [(AlertKind.UPDATE_RATIO, "high"), (AlertKind.UPDATE_RATIO, "high severe")]
        keys += [(AlertKind.UPDATE_RATIO, f"frozen {n}") for n in r.names]
        keys += [(AlertKind.GRADIENT_UNDERFLOW, n) for n in r.names] + [(AlertKind.GRADIENT_UNDERFLOW, "unscaled")]
        out += [(kind, key, found.get((kind, key))) for kind, key in keys]
        return out
