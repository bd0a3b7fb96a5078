"""Non-finite checks: pure functions on tensors, no Lightning, no host syncs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gradwatch.functional.norms import tensor_norms

__all__ = ["any_non_finite", "may_be_non_finite", "non_finite_mask"]


def non_finite_mask(tensors: Sequence[Tensor]) -> Tensor:
    """Which tensors hold a NaN or an Inf, as a bool vector on the first tensor's device. Exact.

    Uses the max-abs norm (one ``foreach`` kernel per device/dtype group): NaN and Inf propagate into it, and
    unlike the 2-norm it cannot overflow on large but finite values. On CPU it is several times slower than
    :func:`may_be_non_finite`: use that as the per-step screen and this one to confirm.
    """
    return ~torch.isfinite(tensor_norms(tensors, math.inf))


def any_non_finite(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """A 0-dim bool device tensor: does any of ``tensors`` hold a NaN or an Inf? Exact; no host sync.

    With no tensors it is ``False``, made on ``device``: a host tensor copied there later would be a sync."""
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.bool, device=device)
    return non_finite_mask(tensors).any()


def may_be_non_finite(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """A 0-dim bool device tensor, a cheap screen for :func:`any_non_finite`; no host sync.

    ``False`` proves every tensor finite. ``True`` means a NaN or an Inf, or a 2-norm that overflowed float32
    on finite values (elements beyond about 1e19, or a sum of squares beyond 3.4e38): confirm with
    :func:`any_non_finite` before acting. One ``foreach`` 2-norm pass, read-only (the fastest ``foreach``
    reduction on CPU; on GPU the same single kernel as the exact check).
    """
    if len(tensors) == 0:  # made on ``device``: copying a host False there would wait for the stream
        return torch.zeros((), dtype=torch.bool, device=device)
    return ~torch.isfinite(tensor_norms(tensors, 2.0)).all()
