"""The per-layer gradient norms of the last steps, kept for the one case they are needed: a run that fails.

When NaNGuard halts a run before its first logging step, TensorBoard would hold no gradient norm and the report no
gradient-flow picture: the charts would be missing exactly when they are needed. :class:`NormRing` keeps the norms
of the last :data:`STEPS` steps where they already are (a row copy per step on the device; the floats on a CPU) and
hands them over, once, when the run stops on a fault, to be written at the steps they belong to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Steps kept.
STEPS = 16


@dataclass(frozen=True)
class RecentNorms:
    """What the ring held when read: per kept step, its logger step, global step, and per-layer norms."""

    names: list[str]
    numels: list[float]
    logger_steps: list[int]
    steps: list[int]
    norms: list[list[float]]

    def rms(self, row: int) -> list[float]:
        """Row ``row``'s norms as RMS per element (the gradient-flow picture's measure, zeros included)."""
        return [n / math.sqrt(k) if k else 0.0 for n, k in zip(self.norms[row], self.numels, strict=True)]


class NormRing:
    """The last :data:`STEPS` steps' per-layer norms of one optimizer (on the device, or Python floats)."""

    def __init__(self) -> None:
        self._rows: Tensor | None = None
        self._host: list[list[float]] = []
        self._steps: list[tuple[int, int]] = []  # (logger step, global step) per kept row, oldest first
        self._names: list[str] = []
        self._count = 0  # rows written on the device
        self._numels: list[float] = []

    def push(
        self, names: list[str], numels: Tensor, logger_step: int, step: int, layer_norms: Tensor | list[float]
    ) -> None:
        """Keep this step's ``layer_norms`` (``numels``: each layer's size, a CPU tensor, read when layers change)."""
        if names != self._names:  # the layers changed (a group added mid-run): start afresh
            self._rows, self._host, self._steps, self._names = None, [], [], list(names)
            self._numels = numels.tolist()
        if isinstance(layer_norms, list):
            self._host = (self._host + [list(layer_norms)])[-STEPS:]
        else:
            if self._rows is None or self._rows.device != layer_norms.device:
                self._rows, self._count = torch.zeros(STEPS, len(names), device=layer_norms.device), 0
            self._rows[self._count % STEPS].copy_(layer_norms.detach().float())
            self._count += 1
        self._steps = (self._steps + [(logger_step, step)])[-STEPS:]

    def read(self, after_step: int) -> RecentNorms | None:
        """The kept steps after ``after_step`` (the last logging step), on the host (one transfer): the fault path."""
        if not self._steps:
            return None
        if self._rows is None:
            rows = self._host
        else:
            start = self._count % STEPS if self._count >= STEPS else 0  # the oldest row
            ordered = torch.cat([self._rows[start:], self._rows[:start]]) if start else self._rows
            rows = ordered[: min(self._count, STEPS)].tolist()
        kept = [(ls, s, r) for (ls, s), r in zip(self._steps, rows, strict=True) if s > after_step]
        if not kept:
            return None
        steps = [k[1] for k in kept]
        return RecentNorms(self._names, self._numels, [k[0] for k in kept], steps, [k[2] for k in kept])


def combine_on_host(norms: list[float], group_of: list[int], groups: int, norm_type: float) -> list[float]:
    """Per-group p-norms from per-parameter ones, as Python floats (the CPU's host path)."""
    if math.isinf(norm_type):
        out = [0.0] * groups
        for g, n in zip(group_of, norms, strict=True):
            out[g] = max(out[g], n)
        return out
    powered = [0.0] * groups
    for g, n in zip(group_of, norms, strict=True):
        powered[g] += n**norm_type
    return [v ** (1.0 / norm_type) for v in powered]


def write_recent(trainer: Any, recent: RecentNorms, suffix: str, norm_type: float) -> int:
    """Write the kept steps' finite norms to every logger, each at its own step (rank zero); returns how many
    steps were written."""
    if not trainer.is_global_zero:
        return 0
    for logger_step, norms in zip(recent.logger_steps, recent.norms, strict=True):
        metrics = {f"gradwatch/grad_norm/{n}": v for n, v in zip(recent.names, norms, strict=True) if math.isfinite(v)}
        finite = [v for v in norms if math.isfinite(v)]
        if len(finite) == len(norms):
            total = max(finite) if math.isinf(norm_type) else sum(v**norm_type for v in finite) ** (1 / norm_type)
            metrics[f"gradwatch/global/grad_norm{suffix}"] = total
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=logger_step)
    for logger in trainer.loggers:
        logger.save()
    return len(recent.steps)
