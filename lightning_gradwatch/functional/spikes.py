"""Loss-spike math: a robust z-score of a value against a window of recent ones; pure, no host syncs."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["robust_zscore"]

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
