"""Fixed-size ring buffers of values on the device: pure functions, no host sync. The callbacks keep a window of
recent values (AdaptiveClipping's gradient norms for its percentile, LossSpikeGuard's losses) as a tensor and a
0-dim count of every value pushed; these write into it and read a quantile of what it holds."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ring_push", "ring_quantile"]


def ring_push(buffer: Tensor, count: Tensor, value: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Write ``value`` into the ring buffer ``buffer`` at position ``count % len(buffer)`` when ``valid``.

    ``count`` (a 0-dim int64 tensor) counts every value ever pushed; the slots in use are the first
    ``min(count, len(buffer))``. Nothing happens where ``valid`` is False. Returns the new ``(buffer, count)``.
    """
    position = (count % buffer.numel()).reshape(1)
    current = buffer.index_select(0, position)
    new_value = torch.where(valid, value.to(buffer.dtype), current.squeeze(0)).reshape(1)
    return buffer.index_copy(0, position, new_value), count + valid.to(count.dtype)


def ring_quantile(buffer: Tensor, count: Tensor, q: float) -> Tensor:
    """The ``q``-quantile (linear interpolation, like ``torch.quantile``) of the filled slots of a ring buffer.

    Returns ``inf`` while the buffer is empty. Unfilled slots are ignored: they sort after every real value as
    ``inf`` and the interpolation indices only reach the filled ones. One sort of the buffer, no sync.
    """
    size = buffer.numel()
    filled = count.clamp(max=size)
    slots = torch.arange(size, device=buffer.device)
    values = torch.where(slots < filled, buffer, torch.full_like(buffer, math.inf))
    ordered = values.sort().values
    rank = (filled - 1).clamp_min(0).to(buffer.dtype) * q
    low = rank.floor().long().clamp(0, size - 1)
    high = (low + 1).clamp(max=(filled - 1).clamp_min(0))
    frac = rank - low.to(buffer.dtype)
    lo_v = ordered.index_select(0, low.reshape(1)).squeeze(0)
    hi_v = ordered.index_select(0, high.reshape(1)).squeeze(0)
    result = lo_v + frac * (hi_v - lo_v)
    result = torch.where(frac > 0, result, lo_v)  # inf - inf when only one value: avoid NaN
    return torch.where(filled > 0, result, torch.full_like(result, math.inf))
