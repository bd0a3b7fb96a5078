"""Loss-spike math: a robust z-score of a value against a window of recent ones; pure, no host syncs.

:func:`robust_zscore` works on a device ring buffer; :func:`robust_zscore_of_floats` is the same definition on
Python floats, for the CPU's host path (a dozen tensor operations per step cost more than the sort of a short list).
:func:`is_spike` judges a z-score and the loss's absolute excess over the median, on either. :func:`batch_fingerprint`
identifies a batch by its content, so a recorded spike's batch is found again after the data order changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gradwatch.functional._scalars import Flag, Scalar

__all__ = [
    "batch_fingerprint",
    "fingerprint_probe",
    "is_spike",
    "robust_zscore",
    "robust_zscore_of_floats",
    "same_fingerprint",
]

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


def is_spike(z: Scalar, loss: Scalar, median: Scalar, z_threshold: float, min_delta: float) -> Flag:
    """Whether ``loss`` is a spike: more than ``z_threshold`` robust standard deviations above ``median`` *and* more
    than ``min_delta`` above it in absolute terms, and finite. The absolute floor keeps a loss near zero quiet: from
    1e-5 to 3e-5, or the fp16 rounding of a tiny loss, is hundreds of robust deviations but no spike. Floats in,
    a bool out (the host path); 0-dim tensors in, a bool tensor out (the device path)."""
    if isinstance(loss, Tensor):
        return (z > z_threshold) & (loss - median > min_delta) & torch.isfinite(loss)
    return bool(z > z_threshold and loss - median > min_delta and math.isfinite(loss))


def fingerprint_probe(numel: int, device: torch.device, samples: int = 64) -> tuple[Tensor, Tensor]:
    """The positions :func:`batch_fingerprint` reads in a tensor of ``numel`` elements (``samples`` spread evenly
    over all of it: every sequence or image of a batch counts, not only the first) and their weights."""
    count = max(1, min(samples, numel))
    index = torch.linspace(0, max(numel - 1, 0), count, device=device).round().long()
    weights = 1.0 + torch.arange(count, device=device, dtype=torch.float32) * 0.6180339887
    return index, weights


def batch_fingerprint(x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """A cheap fingerprint of a batch's tensor ``x``: a weighted sum of the elements at ``index``
    (:func:`fingerprint_probe`), float32, 0-dim, on ``x``'s device; no host sync. Equal batches give equal values;
    different data practically never do."""
    return (x.detach().reshape(-1)[index].to(torch.float32) * weights).sum()


def same_fingerprint(a: Scalar, b: Scalar, rel: float = 1e-6) -> Flag:
    """Whether two fingerprints (or a fingerprint and a tensor of them: any) are equal up to float32 rounding."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a_t, b_t = torch.as_tensor(a), torch.as_tensor(b)
        return ((a_t - b_t).abs() <= rel * torch.maximum(a_t.abs(), torch.ones_like(a_t))).any()
    return abs(a - b) <= rel * max(abs(a), 1.0)
