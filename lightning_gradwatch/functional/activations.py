"""Activation-health math: pure functions on tensors, no Lightning, no host syncs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alive_units", "dead_fractions", "saturated_count", "saturation_bound", "segment_sum"]


def alive_units(pre_activation: Tensor, unit_dim: int) -> Tensor:
    """Which units had a positive pre-activation for at least one sample/position: a bool vector over units.

    A rectifier's unit whose pre-activation is ``<= 0`` everywhere outputs 0 and passes no gradient: it is dead
    on this batch. ``unit_dim`` is the feature axis (``-1`` for Linear, ``1`` for Conv and BatchNorm). A unit whose
    pre-activation holds NaN counts as alive: a non-finite batch says nothing about whether it died.
    """
    x = pre_activation.detach().movedim(unit_dim, -1)
    peak = x.reshape(-1, x.shape[-1]).amax(dim=0)
    return (peak > 0) | torch.isnan(peak)


def saturation_bound(kind: str, margin: float) -> float:
    """The pre-activation magnitude beyond which ``sigmoid`` (or ``tanh``) output lies within ``margin`` of its bounds."""
    if kind == "sigmoid":
        return math.log((1 - margin) / margin)  # logit(1 - margin)
    if kind == "tanh":
        return math.atanh(1 - margin)
    raise ValueError(f"`kind` must be 'sigmoid' or 'tanh', got {kind!r}.")


def saturated_count(pre_activation: Tensor, bound: float) -> Tensor:
    """How many elements of ``pre_activation`` are saturated (``|x| >= bound``), as a 0-dim float32 tensor."""
    return (pre_activation.detach().abs() >= bound).sum(dtype=torch.float32)


def segment_sum(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Per-segment sums of a flat vector (``segment_ids[i]`` names the segment of ``values[i]``), as float32.

    Used to turn a flat vector of per-unit flags (all layers' units end to end) into per-layer counts on device,
    so that only one number per layer crosses to the host.
    """
    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    return out.index_add_(0, segment_ids, values.to(torch.float32))


def dead_fractions(alive: Tensor, segment_ids: Tensor, units: Tensor) -> Tensor:
    """Fraction of dead units per layer from a flat ``alive`` flag vector (all layers' units end to end)."""
    return 1.0 - segment_sum(alive, segment_ids, units.numel()) / units.to(torch.float32).clamp_min(1)
