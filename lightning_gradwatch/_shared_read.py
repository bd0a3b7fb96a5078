"""The one host read a step already makes, shared: small device values ride along with NaNGuard's flag.

Under ``32-true`` and ``bf16-mixed`` NaNGuard reads one reduced flag per step (under ``16-mixed``, its counters at a
cadence): that read is the step's host sync. Other callbacks post small tensors before it (the activation
callbacks' tallies, LossSpikeGuard's spike flag); NaNGuard all-reduces them with its own flags (max over ranks) and
brings them to the host in the same transfer, then hands them back. A callback that finds nothing delivered (no
guard, or a step it does not read) falls back to its own transfer on a logging step. So checks that would need a
sync of their own happen, in the preset, as often as every step at no extra sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gradwatch._distributed import all_reduce_max, distributed


class SharedRead:
    """Posted values for the current optimizer step, and what the reader delivered for them."""

    def __init__(self) -> None:
        self._step = -1
        self._posted: dict[int, Tensor] = {}  # id(owner) -> a flat float tensor
        self._delivered: dict[int, list[float]] = {}

    def _at(self, step: int) -> None:
        if step != self._step:
            self._step, self._posted, self._delivered = step, {}, {}

    def post(self, owner: object, values: Tensor, step: int) -> None:
        """Offer ``values`` (reduced across ranks by max, with the reader's flags) for this step's read."""
        self._at(step)
        self._posted[id(owner)] = values.detach().reshape(-1).to(torch.float32)

    def collect(self, step: int) -> tuple[list[int], list[Tensor]]:
        """For the reader: the owners and tensors posted for ``step``."""
        self._at(step)
        return list(self._posted), list(self._posted.values())

    def deliver(self, step: int, owners: list[int], posted: list[Tensor], values: list[float]) -> None:
        """For the reader: the host values of what :meth:`collect` gave, flat, in the same order."""
        self._at(step)
        start = 0
        for owner, tensor in zip(owners, posted, strict=True):
            self._delivered[owner] = values[start : start + tensor.numel()]
            start += tensor.numel()

    def read(self, step: int, flags: Tensor | list[float]) -> list[float]:
        """For the reader: ``flags`` and everything posted, max-reduced over ranks (one collective) and brought to
        the host (one transfer); returns the flags' values and delivers the rest. Flags already on the host (a
        CPU reader) need no tensor at all when nothing is posted and there is one rank."""
        owners, posted = self.collect(step)
        if isinstance(flags, list):
            if not posted and not distributed():
                return flags
            flags = torch.tensor(flags, dtype=torch.float32, device=posted[0].device if posted else "cpu")
        values = all_reduce_max(torch.cat([flags, *(p.to(flags.device) for p in posted)])).tolist()
        self.deliver(step, owners, posted, values[flags.numel() :])
        return values[: flags.numel()]

    def take(self, owner: object, step: int) -> list[float] | None:
        """What was delivered for ``owner`` this step (once), or ``None`` if its values were not read."""
        self._at(step)
        return self._delivered.pop(id(owner), None)
