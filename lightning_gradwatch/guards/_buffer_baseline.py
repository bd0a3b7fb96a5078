"""Buffers that hold non-finite values by design, so that a buffer is judged by what a step did to it.

A causal attention mask built with ``nn.Transformer.generate_square_subsequent_mask(T)`` (or
``torch.triu(torch.full((T, T), float("-inf")), 1)``) and registered as a buffer, the usual way in hand-written GPTs,
is ``-inf`` above the diagonal from the start and never changes: that is data, not a fault. The first time a buffer
is seen (at the start of training, or when it appears), the positions where it is infinite are remembered; from then
on those positions, while they stay infinite, are left out of every finiteness check. A NaN anywhere, or an Inf in a
position that was finite, is still a fault. A buffer that changes shape (a mask rebuilt for a longer sequence) is
seen afresh.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from lightning_gradwatch.guards._snapshot import float_buffers

# module -> {buffer name: where it was infinite when first seen} (only buffers that were); names seen at all
_INFINITE_AT_START: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = weakref.WeakKeyDictionary()
_SEEN: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[int, ...]]] = weakref.WeakKeyDictionary()


def remember_buffers(module: nn.Module, buffers: list[tuple[str, Tensor]] | None = None) -> None:
    """Note which float buffers of ``module`` (``buffers``: its :func:`float_buffers`, if already listed) are infinite
    where, for buffers not seen before (or reshaped). One host read when there are such buffers (at the start of
    training); none afterwards while they stay the same."""
    seen = _SEEN.setdefault(module, {})
    infinite = _INFINITE_AT_START.setdefault(module, {})
    new = [(n, b) for n, b in (float_buffers(module) if buffers is None else buffers) if seen.get(n) != tuple(b.shape)]
    if not new:
        return
    has_inf = torch.stack([torch.isinf(b).any() for _, b in new]).tolist()
    for (name, buffer), inf in zip(new, has_inf, strict=True):
        seen[name] = tuple(buffer.shape)
        if inf:
            infinite[name] = torch.isinf(buffer.detach())
        else:
            infinite.pop(name, None)


def judged_buffers(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``module``'s float buffers as a finiteness check should see them: a buffer infinite by design has its
    original infinite positions set to 0 while they are still infinite (NaN and new Infs stay). No host read once
    the buffers are known."""
    buffers = float_buffers(module)
    remember_buffers(module, buffers)
    infinite = _INFINITE_AT_START.get(module, {})
    if not infinite:
        return buffers
    out = []
    for name, buffer in buffers:
        mask = infinite.get(name)
        if mask is not None:
            mask = mask.to(buffer.device)
            buffer = torch.where(mask & torch.isinf(buffer), torch.zeros((), dtype=buffer.dtype), buffer.detach())
        out.append((name, buffer))
    return out
