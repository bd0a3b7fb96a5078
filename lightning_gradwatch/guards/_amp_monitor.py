"""NaNGuard's view of fp16 loss scaling: overflow-skipped steps counted on the device, read at a cadence.

Under ``16-mixed`` a step whose gradients overflowed is normal: the GradScaler skips it and lowers the scale. The
monitor counts such steps from the scaler's own found-inf flag (or, for fused optimizers that look for inf inside
their own step, from the scale's backoff one step later), with no host sync; :meth:`AmpMonitor.read` brings the
counters to the host in one transfer when the guard asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gradwatch._distributed import all_reduce_max
from lightning_gradwatch._precision import scale_of
from lightning_gradwatch._reporting import host_values
from lightning_gradwatch._shared_read import SharedRead
from lightning_gradwatch.alerts import Alert, AlertKind, alert_message


@dataclass(frozen=True)
class AmpReading:
    """What happened since the previous reading, reduced over ranks."""

    loss_faults: int  # steps whose loss was non-finite
    max_consecutive: int  # the longest run of overflow-skipped steps
    consecutive: int  # the current run of overflow-skipped steps
    overflows: int  # overflow-skipped steps (this rank)
    scale: float  # the current loss scale
    extra: list[float]  # the caller's values (max over ranks), flat, in the order given

    def collapse(self, min_scale: float, max_consecutive: int) -> tuple[str, float, float] | None:
        """``(why, value, threshold)`` when fp16 training has collapsed: the scale below ``min_scale``, or
        ``max_consecutive`` overflow-skipped steps in a row; ``None`` otherwise."""
        if self.scale < min_scale:
            return f"the loss scale fell to {self.scale:.3g}, below the floor {min_scale:g}", self.scale, min_scale
        if self.max_consecutive >= max_consecutive:
            why = f"{self.max_consecutive} consecutive steps overflowed and were skipped"
            return why, float(self.max_consecutive), float(max_consecutive)
        return None

    def collapse_alert(self, step: int, min_scale: float, max_consecutive: int) -> tuple[Alert, str] | None:
        """The ``loss_scale_collapse`` alert and its reason when fp16 training has collapsed (:meth:`collapse`)."""
        collapse = self.collapse(min_scale, max_consecutive)
        if collapse is None:
            return None
        reason, value, threshold = collapse
        finding = (
            f"Loss-scale collapse at step {step}: {reason}; fp16 training is broken (every update is being skipped) "
            "and training stops."
        )
        message = alert_message(AlertKind.LOSS_SCALE_COLLAPSE, finding)
        return Alert(step, AlertKind.LOSS_SCALE_COLLAPSE, "", value, threshold, message), reason


class AmpMonitor:
    """Device-side counters of overflow-skipped steps and non-finite losses under a GradScaler."""

    def __init__(self) -> None:
        self._counters: dict[str, Tensor] = {}
        self._previous_scale: Tensor | None = None

    def reset(self) -> None:
        self._counters = {}
        self._previous_scale = None

    def observe(
        self, scaler: torch.amp.GradScaler, found_inf: Tensor | None, loss_bad: Tensor, device: torch.device
    ) -> None:
        """Fold one optimizer step in (no host sync)."""
        c = self._counters
        if not c:
            c.update({k: torch.zeros((), device=device) for k in ("overflows", "consecutive", "longest", "loss")})
        if found_inf is not None:
            overflow = (found_inf > 0).to(device, torch.float32)
        else:
            # fused optimizers look for inf inside scaler.step, after this hook. The scaler backs the scale off
            # exactly when a step overflowed, so a lower scale than at the last step means the previous step
            # overflowed: exact, free, one step late.
            current = scale_of(scaler)
            assert current is not None
            scale = current.detach().reshape(()).to(device, torch.float32)
            previous = self._previous_scale
            overflow = (scale < previous).float() if previous is not None else torch.zeros((), device=device)
            self._previous_scale = scale.clone()
        c["overflows"] += overflow
        c["consecutive"] = (c["consecutive"] + 1) * overflow
        c["longest"] = torch.maximum(c["longest"], c["consecutive"])
        c["loss"] += loss_bad.to(device, torch.float32)

    def read_riding(
        self, scaler: torch.amp.GradScaler, flags: Tensor, shared: SharedRead, global_step: int
    ) -> AmpReading:
        """:meth:`read` with the caller's ``flags`` first in ``extra``, and the values others posted to the step's
        shared read riding in the same transfer (delivered to them; left out of ``extra``)."""
        owners, posted = shared.collect(global_step)
        extra = torch.cat([flags.reshape(-1).float(), *(p.to(flags.device) for p in posted)])
        reading = self.read(scaler, extra, flags.device)
        shared.deliver(global_step, owners, posted, reading.extra[flags.numel() :])
        return reading

    def read(self, scaler: torch.amp.GradScaler, extra: Tensor, device: torch.device) -> AmpReading:
        """Reduce the counters (and the caller's flat ``extra`` values) across ranks and bring them to the host in
        one transfer; the window starts afresh."""
        scale_now = scale_of(scaler)
        assert scale_now is not None
        c = self._counters
        if not c:
            self.observe(scaler, None, torch.zeros((), dtype=torch.bool, device=device), device)
        flags = torch.cat([torch.stack([c["loss"], c["longest"]]), extra.to(device, torch.float32).reshape(-1)])
        reduced = all_reduce_max(flags)  # at the reading cadence only
        values, (scale,), (overflows,), (consecutive,) = host_values(
            reduced, scale_now, c["overflows"], c["consecutive"]
        )
        c["overflows"].zero_()
        c["loss"].zero_()
        c["longest"].copy_(c["consecutive"])
        return AmpReading(
            loss_faults=int(values[0]),
            max_consecutive=int(values[1]),
            consecutive=int(consecutive),
            overflows=int(overflows),
            scale=scale,
            extra=values[2:],
        )
