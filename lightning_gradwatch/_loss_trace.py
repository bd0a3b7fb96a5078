"""The training loss of each optimizer step, kept for the rules that need to know where the loss is going.

A growing gradient norm while the loss keeps falling is a healthy fine-tune, not an explosion; a loss that rose over
the first steps while the updates are a tenth of the weights is a learning rate far too high; a NaN at the end of a
loss that grew a million-fold is a divergence, not a bad operation. :class:`LossTrace` keeps, per Trainer, the loss
of the first :data:`FIRST` optimizer steps and of the last :data:`RECENT` ones (the sum of a step's micro-batch
losses, unscaled under fp16), recorded by the first gradwatch callback in ``on_before_backward``: Python floats on a
CPU (a host read is free there), a device ring elsewhere (no sync: the step index is known on the host), brought to
the host only by a caller that transfers anyway (a logging step, the fault path) with :meth:`LossTrace.host`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gradwatch._precision import unscaled_loss
from lightning_gradwatch._reporting import host_values
from lightning_gradwatch._step import host_is_free

#: Steps kept from the start of the run, and from its end.
FIRST, RECENT = 16, 128


@dataclass(frozen=True)
class LossHistory:
    """The recorded losses on the host: ``first[i]`` is step ``i``'s; ``recent`` the last steps, oldest first,
    ending at step ``last_step``. NaN where a step's loss was non-finite."""

    first: list[float]
    recent: list[float]
    last_step: int

    def recent_steps(self) -> list[int]:
        return list(range(self.last_step - len(self.recent) + 1, self.last_step + 1))

    def improving(self, span: int = 50, margin: float = 0.02) -> bool | None:
        """Whether the loss fell over the last ``span`` steps: the median of the newer half below the median of the
        older half by more than ``margin`` of its magnitude (``None`` with too few finite losses to say)."""
        window = [v for v in self.recent[-span:] if math.isfinite(v)]
        if len(window) < 8:
            return None
        half = len(window) // 2
        older, newer = statistics.median(window[:half]), statistics.median(window[half:])
        return newer < older - margin * abs(older)

    def reference(self) -> float | None:
        """The loss the run started from: the median of its first three finite steps (of the oldest recorded ones
        after a resume), ``None`` when unknown."""
        start = [v for v in (self.first or self.recent)[:3] if math.isfinite(v)]
        return statistics.median(start) if start else None

    def divergence(self, factor: float = 10.0) -> Divergence | None:
        """The loss's growth when its last finite value is at least ``factor`` times where the run started."""
        reference = self.reference()
        last = next(
            (
                (s, v)
                for s, v in zip(reversed(self.recent_steps()), reversed(self.recent), strict=True)
                if math.isfinite(v)
            ),
            None,
        )
        if reference is None or reference <= 0 or last is None or last[1] < factor * reference:
            return None
        return Divergence(reference, last[1], last[0])


@dataclass(frozen=True)
class Divergence:
    """The loss grew from ``start`` (where the run began) to ``end`` at step ``end_step``."""

    start: float
    end: float
    end_step: int

    @property
    def factor(self) -> float:
        return self.end / self.start

    def describe(self) -> str:
        return (
            f"the training loss diverged: it grew {self.factor:.3g}-fold, from {self.start:.4g} at the start to "
            f"{self.end:.4g} at step {self.end_step}"
        )


class LossTrace:
    """The per-step training loss of one fit (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._step = -1  # the step being recorded: the last one written into the ring (steps only grow in a fit)
        self._first: list[Any] = []  # floats, or 0-dim device tensors
        self._ring: Tensor | list[float] | None = None
        self._recorded = 0  # steps recorded

    @property
    def steps(self) -> int:
        """How many optimizer steps have a recorded loss."""
        return self._recorded

    def record(self, trainer: Any, loss: Tensor) -> None:
        """Add ``loss`` (one backward's, possibly scaled) to the loss of the step about to be taken."""
        step = trainer.global_step
        value: Tensor | float = unscaled_loss(trainer, loss)
        if host_is_free(loss.device):
            value = float(value)
        if self._ring is None or isinstance(self._ring, list) != isinstance(value, float):
            self._ring = (
                [math.nan] * RECENT if isinstance(value, float) else torch.full((RECENT,), math.nan, device=loss.device)
            )
        slot = step % RECENT
        if step == self._step:  # another micro-batch of the same step
            self._ring[slot] = self._ring[slot] + value
        else:
            self._step = step
            self._ring[slot] = value
            self._recorded += 1
        if step < FIRST:
            while len(self._first) <= step:
                self._first.append(math.nan)
            self._first[step] = self._ring[slot] if isinstance(self._ring, list) else self._ring[slot].clone()

    def may_diverge(self, factor: float) -> bool:
        """On the host path: whether the latest step's loss is at least ``factor`` times the first one's (or either
        is unknown), a cheap test before building the history; always True on the device path."""
        if not isinstance(self._ring, list) or not self._first:
            return True
        latest, first = self._ring[self._step % RECENT], float(self._first[0])
        return not (math.isfinite(latest) and math.isfinite(first) and first > 0) or latest >= factor * first

    def device_values(self) -> list[Tensor]:
        """What :meth:`host` needs, as device tensors to ride on a caller's transfer (empty on the host path)."""
        if not isinstance(self._ring, Tensor):
            return []
        first = [v if isinstance(v, Tensor) else torch.tensor(v) for v in self._first]
        return [torch.stack(first).to(self._ring.device) if first else self._ring[:0], self._ring]

    def host(self, fetched: list[list[float]] | None = None) -> LossHistory:
        """The history on the host: from ``fetched`` (what :meth:`device_values` became in the caller's transfer),
        from the floats on the host path, or with a transfer of its own (the fault path)."""
        if self._ring is None:
            return LossHistory([], [], -1)
        if isinstance(self._ring, list):
            first, ring = [float(v) for v in self._first], list(self._ring)
        else:
            if fetched is None:
                fetched = [t.tolist() for t in self.device_values()]
            first, ring = fetched
        start = (self._step + 1) % RECENT  # the oldest slot
        ordered = ring[start:] + ring[:start]
        return LossHistory(first, ordered[-min(self.steps, RECENT) :], self._step)


def fetch_with_history(
    trainer: Any, trace: LossTrace, *tensors: Tensor
) -> tuple[list[list[float]], LossHistory | None]:
    """``host_values(*tensors)`` with the loss history riding in the same transfer (the one of a logging step);
    the history is ``None`` where several optimizers make the summed loss meaningless for one of them."""
    if len(trainer.optimizers) > 1:
        return (host_values(*tensors) if tensors else []), None
    riding = trace.device_values()  # empty on a CPU: the history is on the host already
    fetched = host_values(*tensors, *riding) if tensors or riding else []
    split = len(fetched) - len(riding)
    return fetched[:split], trace.host(fetched[split:] if riding else None)
