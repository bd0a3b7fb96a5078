"""The probe batch of the slow-cadence callbacks (GradientGeometry, GradientsThroughTime): a detached copy of the
first rows of a training batch, kept apart from the run."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def first_rows(batch: Any, n: int) -> Any:
    """A copy of the first ``n`` rows of every tensor in ``batch`` (tensors, lists, tuples and dicts of them)."""
    if isinstance(batch, Tensor):
        return batch[:n].detach().clone() if batch.dim() else batch
    if isinstance(batch, dict):
        return type(batch)({k: first_rows(v, n) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        rows = [first_rows(v, n) for v in batch]
        return type(batch)(*rows) if hasattr(batch, "_fields") else type(batch)(rows)
    return batch
