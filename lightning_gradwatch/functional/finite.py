"""Non-finite checks: pure functions on tensors, no Lightning, no host syncs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gradwatch.functional.norms import tensor_norms

__all__ = ["any_non_finite", "non_finite_mask"]


def non_finite_mask(tensors: Sequence[Tensor]) -> Tensor:
    """Which tensors hold a NaN or an Inf, as a bool vector on the first tensor's device.

    Uses the max-abs norm (one ``foreach`` kernel per device/dtype group): NaN and Inf propagate into it, and
    unlike the 2-norm it cannot overflow on large but finite values.
    """
    return ~torch.isfinite(tensor_norms(tensors, math.inf))


def any_non_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool device tensor: does any of ``tensors`` hold a NaN or an Inf? No host sync."""
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.bool)
    return non_finite_mask(tensors).any()
