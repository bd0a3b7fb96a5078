"""LossSpikeGuard's window of recent losses, and the verdict it gives on each step's loss.

The window is a ring buffer of the last ``size`` losses that were not spikes; a run of consecutive spikes is kept
aside, and when it reaches ``level_shift_after`` steps it is a level shift (the loss moved for good) and refills the
window. On a GPU the window is a device tensor and a verdict costs no host sync; on a CPU (one process) it is a list
and the verdict is taken on the host, in microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gradwatch.functional.rings import ring_push
from lightning_gradwatch.functional.spikes import is_spike, robust_zscore, robust_zscore_of_floats

# one step's verdict: its flags (max-reduced over ranks with the shared read, or at LossSpikeGuard's own), then values
V_SPIKE, V_SHIFT, V_DROP, V_Z, V_LOSS, V_MEDIAN, V_PRINT = range(7)
VERDICT_SIZE = 7


class LossWindow:
    """The recent losses of a run and the spike verdict on the next one.

    Args:
        size: how many losses the window holds.
        level_shift_after: a run of this many spikes is a level shift: it refills the window.
        warmup_steps: no verdict of a spike before the window has taken this many losses.
        z_threshold: the robust z-score above which a loss is a spike.
        min_delta: and at least this far above the median.
    """

    def __init__(
        self, size: int, level_shift_after: int, warmup_steps: int, z_threshold: float, min_delta: float
    ) -> None:
        self.size, self.level_shift_after, self.warmup_steps = size, level_shift_after, warmup_steps
        self.z_threshold, self.min_delta = z_threshold, min_delta
        # the ring and how many it has taken: on the device, or a list on the CPU's host path
        self.losses: Tensor | list[float] | None = None
        self.count: Tensor | int = 0
        # the current run of consecutive spikes: its length and its losses (a level shift refills the window with them)
        self._run: Tensor | int = 0
        self._recent: Tensor | list[float] | None = None
        self._consts: _Constants | None = None

    def judge(self, loss: Tensor, fingerprint: Tensor | float | None, drop: Tensor | bool) -> Tensor:
        """This step's verdict (``V_*``), on the device: ``fingerprint`` of the step's batch (kept on a spike only),
        ``drop`` whether the batch is one to skip."""
        if not isinstance(self.losses, Tensor) or self.losses.device != loss.device:
            self.losses, self.count = _window_tensors(self.losses, self.count, self.size, loss.device)
        if not isinstance(self._recent, Tensor) or self._recent.device != loss.device:
            self._run = torch.zeros((), dtype=torch.int64, device=loss.device)  # a run of spikes starts afresh
            self._recent = torch.zeros(self.level_shift_after, device=loss.device)
        assert isinstance(self.count, Tensor) and isinstance(self._run, Tensor)
        z, median, _ = robust_zscore(self.losses, self.count, loss)
        raw = (self.count >= self.warmup_steps) & is_spike(z, loss, median, self.z_threshold, self.min_delta)
        assert isinstance(raw, Tensor)
        shift = raw & (self._run + 1 >= self.level_shift_after)
        spike = raw & ~shift
        c = self._constants(loss.device)
        # the fingerprint of the spiking rank (after the max over ranks), or -inf where none was taken
        kept = torch.where(raw, fingerprint, c.neg_inf) if isinstance(fingerprint, Tensor) else c.neg_inf
        dropped = drop.float() if isinstance(drop, Tensor) else c.one if drop else c.zero
        return torch.stack([spike.float(), shift.float(), dropped, z, loss.to(torch.float32), median, kept])

    def judge_on_host(self, loss: float, fingerprint: Tensor | float | None, drop: Tensor | bool) -> list[float]:
        """:meth:`judge` on the host, with the window as a list."""
        if not isinstance(self.losses, list):
            self.losses, self.count = _window_floats(self.losses, self.count, self.size)
        if not isinstance(self._recent, list):
            self._run, self._recent = 0, [0.0] * self.level_shift_after
        count = int(self.count)
        z, median, _ = robust_zscore_of_floats(self.losses[: min(count, self.size)], loss)
        raw = count >= self.warmup_steps and bool(is_spike(z, loss, median, self.z_threshold, self.min_delta))
        shift = raw and int(self._run) + 1 >= self.level_shift_after
        kept = float(fingerprint) if raw and fingerprint is not None else -math.inf
        return [float(raw and not shift), float(shift), float(bool(drop)), z, loss, median, kept]

    def fold(self, verdict: Tensor | list[float]) -> None:
        """Take this step's loss into the window (not a spike's, a dropped batch's, nor a non-finite one), or, on a
        level shift, refill the window with the run of spikes that made it."""
        if isinstance(verdict, list):
            self._fold_on_host(verdict)
        else:
            self._fold_on_device(verdict)

    def _fold_on_host(self, verdict: list[float]) -> None:
        n = self.level_shift_after
        assert isinstance(self.losses, list) and isinstance(self._recent, list)
        spike, shift, drop, loss = verdict[V_SPIKE] > 0, verdict[V_SHIFT] > 0, verdict[V_DROP] > 0, verdict[V_LOSS]
        run = int(self._run)
        if shift:
            self._recent[run % n] = loss
            self.losses = [self._recent[(j - self.size + run + 1) % n] for j in range(self.size)]
            self.count, self._run = self.size, 0
        elif spike:
            self._recent[run % n] = loss
            self._run = run + 1
        elif not drop:
            self._run = 0
            if math.isfinite(loss):  # NaN (NaNGuard's) never widens the window
                self.losses[int(self.count) % self.size] = loss
                self.count = int(self.count) + 1

    def _fold_on_device(self, verdict: Tensor) -> None:
        n = self.level_shift_after
        assert isinstance(self.losses, Tensor) and isinstance(self.count, Tensor)
        assert isinstance(self._run, Tensor) and isinstance(self._recent, Tensor)
        flags = verdict[: V_DROP + 1] > 0
        spike, shift, drop = flags.unbind()
        loss = verdict[V_LOSS]
        c = self._constants(loss.device)
        at_slot = (c.slots == self._run % n) & flags[: V_SHIFT + 1].any()  # a spike or a shift: part of the run
        self._recent = torch.where(at_slot, loss.to(self._recent.dtype), self._recent)
        valid = ~flags.any() & torch.isfinite(loss)
        losses, count = ring_push(self.losses, self.count, loss, valid)
        refill = self._recent[(c.refill + self._run) % n]  # the run, newest last, cycled over the window
        self.losses = torch.where(shift, refill, losses)
        self.count = torch.where(shift, c.full, count)
        self._run = torch.where(spike, self._run + 1, torch.where(drop, self._run, c.zero_count))

    def _constants(self, device: torch.device) -> _Constants:
        c = self._consts
        if c is None or c.zero.device != device:
            c = self._consts = _Constants.on(device, self.size, self.level_shift_after)
        return c

    # -- state -----------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Tensor] | None:
        """The window as CPU tensors, for a checkpoint; ``None`` before the first loss."""
        if self.losses is None:
            return None
        losses, count = _window_tensors(self.losses, self.count, self.size, torch.device("cpu"))
        return {"losses": losses.clone(), "count": count.clone()}

    def load(self, window: dict[str, Tensor]) -> None:
        """Restore a saved window; another window size keeps the newest losses that fit, in order."""
        self.losses, self.count = resized_window(window["losses"], window["count"], self.size)
        self._run, self._recent = 0, None


@dataclass(frozen=True)
class _Constants:
    """The device path's constant tensors, made once per device (no allocation or copy per step)."""

    zero: Tensor
    one: Tensor
    neg_inf: Tensor
    zero_count: Tensor
    full: Tensor  # the window's size, as a count
    slots: Tensor  # 0 .. level_shift_after - 1
    refill: Tensor  # window slot j takes the run's value (j - window + 1 + run) mod level_shift_after

    @classmethod
    def on(cls, device: torch.device, window: int, run: int) -> _Constants:
        def scalar(v: float) -> Tensor:
            return torch.tensor(v, dtype=torch.float32, device=device)

        count = torch.zeros((), dtype=torch.int64, device=device)
        return cls(
            zero=scalar(0.0),
            one=scalar(1.0),
            neg_inf=scalar(float("-inf")),
            zero_count=count,
            full=count + window,
            slots=torch.arange(run, device=device),
            refill=torch.arange(window, device=device) - window + 1 + run * window,  # kept non-negative
        )


def resized_window(losses: Tensor, count: Tensor | int, size: int) -> tuple[Tensor, Tensor]:
    """A saved ring buffer ``losses`` holding ``count`` pushes, as a ring of ``size`` slots holding the newest values
    that fit, in order, with the same count (so the warm-up is not repeated). A larger window than the saved one is
    filled by cycling the saved values (their median and spread stay), until new losses overwrite them."""
    saved, total = losses.detach().to("cpu", torch.float32).reshape(-1), int(count)
    old = saved.numel()
    if old == size:
        return saved.clone(), torch.tensor(total, dtype=torch.int64)
    held = min(total, old)
    start = total % old if total > old else 0
    ordered = torch.cat([saved[start:], saved[:start]])[:held] if held else saved[:0]  # oldest first
    filled = min(total, size)
    out = torch.zeros(size)
    if held:
        values = ordered[(torch.arange(filled) - filled) % held]  # the newest last; cycled when fewer were held
        out[(torch.arange(filled) + total - filled) % size] = values
    return out, torch.tensor(total, dtype=torch.int64)


def _window_tensors(
    losses: Tensor | list[float] | None, count: Tensor | int, size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    if losses is None:
        return torch.zeros(size, device=device), torch.zeros((), dtype=torch.int64, device=device)
    return (
        torch.as_tensor(losses, dtype=torch.float32).to(device),
        torch.as_tensor(count, dtype=torch.int64).to(device),
    )


def _window_floats(losses: Tensor | list[float] | None, count: Tensor | int, size: int) -> tuple[list[float], int]:
    if losses is None:
        return [0.0] * size, 0
    return (losses.tolist() if isinstance(losses, Tensor) else list(losses)), int(count)
