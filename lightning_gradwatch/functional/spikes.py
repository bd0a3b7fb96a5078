"""Loss-spike math: a robust z-score of a value against a window of recent ones; pure, no host syncs.

:func:`robust_zscore` works on a device ring buffer; :func:`robust_zscore_of_floats` is the same definition on
Python floats, for the CPU's host path (a dozen tensor operations per step cost more than the sort of a short list).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["robust_zscore", "robust_zscore_of_floats"]

#: The MAD of a normal distribution is 0.6745 sigma: 1.4826 * MAD estimates sigma, unmoved by the outliers.
MAD_TO_SIGMA = 1.4826


def robust_zscore(
    window: Tensor, filled: Tensor, value: Tensor, rel_floor: float = 1e-3
) -> tuple[Tensor, Tensor, Tensor]:
    """How many robust standard deviations ``value`` lies above the median of the first ``filled`` slots of
    ``window``: ``(value - median) / (1.4826 * MAD)``. Returns ``(z, median, sigma)``, 0-dim tensors.

    A window of identical values has no spread: sigma is floored at ``rel_floor`` times ``|median|`` so a tiny
    wiggle is not an infinite z-score. With nothing filled, z is 0.

    Args:
        window: a ring buffer of recent values (float32).
        filled: how many of its slots hold values (0-dim int64; the rest are ignored).
        value: the new value (0-dim).
        rel_floor: the smallest sigma, relative to the median.
    """
    slots = torch.arange(window.numel(), device=window.device)
    recent = torch.where(slots < filled.clamp(max=window.numel()), window, torch.full_like(window, float("nan")))
    median = torch.nanmedian(recent)
    mad = torch.nanmedian((recent - median).abs())
    sigma = torch.maximum(mad * MAD_TO_SIGMA, median.abs() * rel_floor).clamp_min(torch.finfo(torch.float32).tiny)
    z = (value.to(window.dtype) - median) / sigma
    return torch.where(filled > 0, z, torch.zeros_like(z)), median, sigma


def robust_zscore_of_floats(
    recent: Sequence[float], value: float, rel_floor: float = 1e-3
) -> tuple[float, float, float]:
    """:func:`robust_zscore` of ``value`` against the values ``recent`` (all of them filled), on the host. The median
    is the lower middle value of an even count, as ``torch.nanmedian`` takes it."""
    if not recent:
        return 0.0, math.nan, math.nan
    median = _lower_median(recent)
    mad = _lower_median([abs(v - median) for v in recent])
    sigma = max(mad * MAD_TO_SIGMA, abs(median) * rel_floor, torch.finfo(torch.float32).tiny)
    return (value - median) / sigma, median, sigma


def _lower_median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]
