"""The alert contract shared by every gradwatch callback.

Each callback keeps ``self.alerts: list[Alert]``. An alert is appended when a condition starts (or, for
events such as spikes, when it happens), never once per step while a condition persists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ALERT_KINDS", "Alert", "AlertKind"]


class AlertKind:
    """The alert kinds used across the package (plain strings, so ``alert.kind == "dead_neurons"`` works)."""

    VANISHING_GRADIENT = "vanishing_gradient"
    EXPLODING_GRADIENT = "exploding_gradient"
    DEAD_NEURONS = "dead_neurons"
    SATURATION = "saturation"
    NON_FINITE = "non_finite"
    LOSS_SCALE_COLLAPSE = "loss_scale_collapse"
    GRADIENT_SPIKE = "gradient_spike"


ALERT_KINDS: frozenset[str] = frozenset(v for k, v in vars(AlertKind).items() if k.isupper())


@dataclass(frozen=True)
class Alert:
    """One finding of a gradwatch callback.

    Args:
        step: the trainer's ``global_step`` (optimizer steps completed) when the finding was made.
        kind: one of :data:`ALERT_KINDS`, e.g. ``"exploding_gradient"``.
        name: the layer, module or parameter concerned; ``""`` for a finding about the whole model.
        value: the measured quantity that crossed the threshold.
        threshold: the threshold it crossed.
        message: what is wrong, where, and the usual remedy.
    """

    step: int
    kind: str
    name: str
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        return cls(
            step=int(data["step"]),
            kind=str(data["kind"]),
            name=str(data["name"]),
            value=float(data["value"]),
            threshold=float(data["threshold"]),
            message=str(data["message"]),
        )
