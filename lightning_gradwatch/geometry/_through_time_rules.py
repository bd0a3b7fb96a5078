"""The verdicts of GradientsThroughTime on a probe's reading: pure (readings in, findings out), testable without a
Trainer."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from lightning_gradwatch._loss_trace import LossHistory
from lightning_gradwatch.geometry._through_time_report import HorizonReading

#: The loss is "improving" when the median of its last steps fell by more than this share since a streak began.
IMPROVING_MARGIN = 0.03
#: A run has "learned" once its loss is this share below where it started: a converged model that needs only a
#: short memory (a language model of local structure) has a short horizon and a flat loss, and is healthy.
LEARNED_MARGIN = 0.1
#: Steps of loss whose median stands for the loss at a probe.
LOSS_SPAN = 50
#: Short-horizon probes, at the least, before ``vanishing_through_time`` (a trend needs points).
MIN_PROBES = 3


@dataclass(frozen=True)
class LossLevel:
    """The training loss at a probe: the median of its last steps, and where the run started (``None``: unknown)."""

    median: float | None
    start: float | None

    @property
    def learned(self) -> bool:
        """Whether the loss is clearly below where the run started (``False`` when either is unknown)."""
        return self.median is not None and self.start is not None and self.median < self.start * (1 - LEARNED_MARGIN)

    @classmethod
    def of(cls, history: LossHistory | None) -> LossLevel:
        recent = [v for v in (history.recent[-LOSS_SPAN:] if history else []) if math.isfinite(v)]
        median = statistics.median(recent) if len(recent) >= 3 else None
        return cls(median, history.reference() if history else None)


def exploding_finding(step: int, r: HorizonReading, loss: LossLevel, factor: float) -> tuple[bool, str]:
    """Whether the recurrence amplifies (the product of its state Jacobians growing past ``factor``), and the
    finding. Where only the input profile is measured (a bidirectional module, a cell loop), its growth counts only
    in a run that has not learned: a gated cell that learns to let an early input in and keep it (a GRU carrying the
    first step) is more sensitive to that input than to the last one, by design, while its loss falls."""
    grows = not math.isfinite(r.peak) or r.peak >= factor
    exploding = grows and (r.peak_of_state or not loss.learned)
    if r.peak_of_state:
        measured = (
            f"a change of its state {r.peak_lag} steps before the end reaches the last output amplified "
            f"{r.peak:.3g}x against one a step before (threshold {factor:g}): the product of its recurrent Jacobians "
            "grows with the lag"
        )
    else:
        measured = (
            f"the sensitivity of its last output to the input {r.peak_lag} steps back is {r.peak:.3g}x that to the "
            f"last input (threshold {factor:g})"
        )
    return exploding, (
        f"Exploding gradients through time in '{r.name}' at step {step}: {measured}, over {r.length} timesteps."
    )


def vanishing_finding(
    streak: list[list[float]],
    step: int,
    r: HorizonReading,
    loss: LossLevel,
    short: bool,
    patience_steps: int,
    threshold: float,
) -> str | None:
    """The finding when the horizon has been short at every probe (three at least) over ``patience_steps``, no
    longer reaching further back, the loss flat over them and still near where the run started; ``None`` otherwise.
    ``streak`` (``[step, loss median, horizon]`` per short probe) is updated in place. A gated cell on a plateau
    reaches further back at each probe as it learns to remember (its horizon sets a new high); a vanilla RNN's stays
    where it is."""
    if short:
        streak.append([float(step), math.nan if loss.median is None else loss.median, float(r.horizon)])
    else:
        streak.clear()
    known = [(int(at), value) for at, value, _ in streak if not math.isnan(value)]
    flat = len(known) >= 2 and known[-1][1] >= known[0][1] * (1 - IMPROVING_MARGIN)
    unlearned = bool(known) and not loss.learned
    reaching = len(streak) >= 2 and streak[-1][2] >= max(h for _, _, h in streak[:-1])
    lasted = len(streak) >= MIN_PROBES and streak[-1][0] - streak[0][0] >= patience_steps
    if not (short and lasted and flat and unlearned and not reaching):
        return None
    start = "" if loss.start is None else f", {loss.start:.4g} at the start of the run"
    best = max(streak[:-1], key=lambda entry: entry[2])
    return (
        f"Vanishing gradients through time in '{r.name}' at step {step}: the gradient of its last output reaches "
        f"back only {r.horizon} of {r.length} timesteps (the sensitivity falls below {threshold:g} at lag "
        f"{r.horizon}, shrinking {r.decay:.3g}x per timestep). It has been short at {len(streak)} probes in a "
        f"row since step {int(streak[0][0])} without reaching further back (longest {int(best[2])} at step "
        f"{int(best[0])}), while the loss has not improved ({known[0][1]:.4g} at step {known[0][0]} -> "
        f"{known[-1][1]:.4g}{start}): a dependency more than {r.horizon} steps back cannot be learned."
    )
