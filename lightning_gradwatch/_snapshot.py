"""Known-good copies of a model's state for NaNGuard: the rollback snapshot and the previous step's buffers.

A copy is only ever taken of a finite state: the caller checks first (:func:`state_tensors` lists what to check), so
neither a rollback nor a halt checkpoint can bring back a NaN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradwatch._params import clean_name, local_tensor


def float_buffers(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The module's floating-point buffers with their names (BatchNorm running statistics, EMA copies, ...)."""
    return [(clean_name(n), b) for n, b in module.named_buffers() if b.is_floating_point() and b.numel()]


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], names: list[str]
) -> list[tuple[str, Tensor]]:
    """Every floating-point tensor of ``optimizer``'s per-parameter state (momentum, Adam moments), named
    ``"<param> (<key>)"``."""
    out = []
    for p, name in zip(params, names, strict=True):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
                out.append((f"{name or '(unregistered)'} ({key})", local_tensor(value.detach())))
    return out


def mutable_buffers(module: nn.Module) -> list[Tensor]:
    """The buffers a forward pass may update: float buffers (running statistics) and one-element counters
    (``num_batches_tracked``); large integer buffers (masks, position ids) are left out."""
    return [b for b in module.buffers() if b.is_floating_point() or b.numel() == 1]


class BufferShadow:
    """The buffers a forward pass updates, as they were before the current optimizer step's forward passes, so that
    a faulty batch's update of the running statistics can be undone. One ``foreach`` copy per step; buffers are
    small."""

    def __init__(self) -> None:
        self.buffers: list[Tensor] = []
        self.copies: list[Tensor] = []

    def refresh(self, module: nn.Module) -> None:
        """Copy the module's float buffers now (before the step's first forward pass)."""
        buffers = mutable_buffers(module)
        if len(buffers) != len(self.buffers) or any(a is not b for a, b in zip(buffers, self.buffers, strict=True)):
            self.buffers = buffers  # first step, or the module replaced a buffer (``.to()``, reassignment)
            self.copies = [b.detach().clone() for b in buffers]
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.copies, [b.detach() for b in buffers])

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_([b.detach() for b in self.buffers], self.copies)


@dataclass
class Snapshot:
    """Known-good weights, buffers and optimizer state, copied on device; restored bit for bit.

    Only the optimizer's per-parameter *state* (momentum, Adam moments, step counts) is kept: its hyperparameters
    (the learning rate an LR scheduler sets, ...) are left as they are, so the schedule goes on after a rollback.
    Later snapshots copy into the same tensors (``foreach``), so memory stays at one copy.
    """

    weights: list[Tensor]
    buffers: list[Tensor]
    states: list[dict[str, Any] | None]  # per parameter, in ``params`` order; None: no state yet

    @classmethod
    def take(
        cls,
        module: nn.Module,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        reuse: Snapshot | None = None,
    ) -> Snapshot:
        dst: list[Tensor] = []
        src: list[Tensor] = []
        weights = _copies([p.detach() for p in params], reuse.weights if reuse else None, dst, src)
        buffers = _copies([b.detach() for b in module.buffers()], reuse.buffers if reuse else None, dst, src)
        states: list[dict[str, Any] | None] = []
        for i, p in enumerate(params):
            state = optimizer.state.get(p)
            old = reuse.states[i] if reuse and len(reuse.states) == len(params) else None
            states.append(None if not state else _copy_state(state, old, dst, src))
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
        return cls(weights, buffers, states)

    def restore(self, module: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        dst: list[Tensor] = [p.detach() for p in params] + [b.detach() for b in module.buffers()]
        src: list[Tensor] = [*self.weights, *self.buffers]
        if len(dst) != len(src):
            raise RuntimeError("NaNGuard: the model's parameters or buffers changed since the rollback snapshot.")
        for p, saved in zip(params, self.states, strict=True):
            if saved is None:
                optimizer.state.pop(p, None)
            else:
                optimizer.state[p] = _copy_state(saved, optimizer.state.get(p), dst, src)
        with torch.no_grad():
            torch._foreach_copy_(dst, src)


def _copies(tensors: list[Tensor], old: list[Tensor] | None, dst: list[Tensor], src: list[Tensor]) -> list[Tensor]:
    """Buffers for copies of ``tensors``: ``old``'s where they fit, queued on ``dst``/``src`` for one foreach copy."""
    out = []
    for i, t in enumerate(tensors):
        o = old[i] if old is not None and len(old) == len(tensors) else None
        if o is not None and _fits(o, t):
            dst.append(o)
            src.append(t)
            out.append(o)
        else:
            out.append(t.clone())
    return out


def _copy_state(
    state: dict[str, Any], old: dict[str, Any] | None, dst: list[Tensor], src: list[Tensor]
) -> dict[str, Any]:
    """A copy of one parameter's optimizer state, reusing ``old``'s tensors where they fit (queued copies)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            o = old.get(key) if old else None
            if isinstance(o, Tensor) and _fits(o, value):
                dst.append(o)
                src.append(value.detach())
                out[key] = o
            else:
                out[key] = value.detach().clone()
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


class Rollbacks:
    """When to take the rollback snapshot and whether a rollback may restore it: a snapshot every ``every`` clean
    steps (the caller checks the state finite first), at most ``max_rollbacks`` restores of the same snapshot
    without ``every`` clean steps in between."""

    def __init__(self, every: int, max_rollbacks: int) -> None:
        self.every, self.max_rollbacks = every, max_rollbacks
        self.snapshot: Snapshot | None = None
        self._restores = 0  # of the current snapshot
        self._clean_since = 0  # clean steps since the snapshot or the last rollback

    @property
    def due(self) -> bool:
        return self.snapshot is None or self._clean_since >= self.every

    def clean_step(self, module: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """A clean step, its state checked finite when :attr:`due`: keep that state as the snapshot then."""
        if self.due:
            self.snapshot = Snapshot.take(module, params, optimizer, reuse=self.snapshot)
            self._restores = self._clean_since = 0
        self._clean_since += 1

    def restore(self, module: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> bool:
        """Roll back to the snapshot; ``False`` (nothing restored) when there is none or it was restored too often.
        The next snapshot needs ``every`` clean steps after this rollback: a fault that keeps coming back sooner
        exhausts ``max_rollbacks``."""
        if self.snapshot is None or self._restores >= self.max_rollbacks:
            return False
        self.snapshot.restore(module, params, optimizer)
        self._restores += 1
        self._clean_since = 0
        return True
