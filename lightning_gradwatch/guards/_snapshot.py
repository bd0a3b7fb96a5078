"""Known-good copies of a model's state for NaNGuard: the rollback snapshot and the previous step's buffers.

A copy is only ever taken of a finite state: the caller checks first, or :meth:`Rollbacks.clean_step` checks itself,
so neither a rollback nor a halt checkpoint can bring back a NaN. Each optimizer has its own snapshot of exactly its
parameters: a rollback of one never writes another's weights.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradwatch._params import OptimizerParams, clean_name, local_tensor


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
    """Known-good weights, buffers and optimizer state of one optimizer, copied on device; restored bit for bit.

    It holds exactly that optimizer's parameters (by identity) and the buffers of the modules they belong to (see
    :func:`owned_buffers`): a restore into other parameters raises instead of writing one model's weights into
    another's. Only the optimizer's per-parameter *state* (momentum, Adam moments, step counts) is kept: its
    hyperparameters (the learning rate an LR scheduler sets, ...) are left as they are, so the schedule goes on after
    a rollback. Later snapshots copy into the same tensors (``foreach``), so memory stays at one copy.
    """

    params: list[nn.Parameter]  # the parameters copied, by identity
    buffer_names: list[str]  # the module's buffers copied, by name
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
        others: list[torch.optim.Optimizer] | None = None,
    ) -> Snapshot:
        """Copy ``params`` (``optimizer``'s), their optimizer state and the buffers they own (``others``: the other
        optimizers of the run, whose modules' buffers are theirs)."""
        if reuse is not None and not _same_params(reuse.params, params):
            reuse = None  # another set of parameters: nothing to copy into
        named = owned_buffers(module, params, others or [])
        dst: list[Tensor] = []
        src: list[Tensor] = []
        weights = _copies([p.detach() for p in params], reuse.weights if reuse else None, dst, src)
        old_buffers = reuse.buffers if reuse and reuse.buffer_names == [n for n, _ in named] else None
        buffers = _copies([b.detach() for _, b in named], old_buffers, dst, src)
        states: list[dict[str, Any] | None] = []
        for i, p in enumerate(params):
            state = optimizer.state.get(p)
            old = reuse.states[i] if reuse else None
            states.append(None if not state else _copy_state(state, old, dst, src))
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
        return cls(list(params), [n for n, _ in named], weights, buffers, states)

    def restore(self, module: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Write the copy back into ``params`` (which must be the very parameters copied) and the module's buffers.

        Raises:
            RuntimeError: ``params`` are not the snapshot's (another optimizer's, or the model changed), or a
                parameter or buffer changed shape since: nothing is written.
        """
        if not _same_params(self.params, params):
            raise RuntimeError(
                f"The rollback snapshot holds {len(self.params)} other parameters than the {len(params)} it was asked "
                "to restore (another optimizer's, or its parameters changed since): refusing to write one set "
                "of weights into another."
            )
        buffers = dict(module.named_buffers())
        missing = [n for n in self.buffer_names if n not in buffers]
        if missing:
            raise RuntimeError(f"The module's buffers {missing[:5]} are gone since the rollback snapshot.")
        targets = [buffers[n] for n in self.buffer_names]
        dst: list[Tensor] = [p.detach() for p in params] + [b.detach() for b in targets]
        src: list[Tensor] = [*self.weights, *self.buffers]
        changed = [i for i, (d, s) in enumerate(zip(dst, src, strict=True)) if d.shape != s.shape]
        if changed:
            raise RuntimeError(
                f"{len(changed)} parameter(s) or buffer(s) changed shape since the rollback snapshot: refusing to "
                "restore it."
            )
        for p, saved in zip(params, self.states, strict=True):
            if saved is None:
                optimizer.state.pop(p, None)
            else:
                optimizer.state[p] = _copy_state(saved, optimizer.state.get(p), dst, src)
        with torch.no_grad():
            torch._foreach_copy_(dst, src)


def _same_params(a: list[nn.Parameter], b: list[nn.Parameter]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def owned_buffers(
    module: nn.Module, params: list[nn.Parameter], others: list[torch.optim.Optimizer]
) -> list[tuple[str, Tensor]]:
    """The module's buffers that go with ``params``: a buffer belongs to the nearest module around it (itself or an
    ancestor) holding parameters of any optimizer, and goes with ``params`` when that module holds one of them.
    A buffer that no such module encloses, or whose module holds parameters of several optimizers, goes with every
    optimizer. With one optimizer that is every buffer."""
    mine = {id(p) for p in params}
    trained = set(mine)
    for optimizer in others:
        trained.update(id(p) for group in optimizer.param_groups for p in group["params"])
    held: dict[str, set[int]] = {}  # module name -> ids of the trained parameters in it (its own and below)
    for name, p in module.named_parameters():
        if id(p) in trained:
            path = name.split(".")[:-1]
            for depth in range(len(path) + 1):
                held.setdefault(".".join(path[:depth]), set()).add(id(p))
    out = []
    for name, buffer in module.named_buffers():
        path = name.split(".")[:-1]
        owner = next((held[k] for k in (".".join(path[:d]) for d in range(len(path), -1, -1)) if k in held), None)
        if owner is None or owner & mine:
            out.append((name, buffer))
    return out


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


class _Slot:
    """One optimizer's snapshot and its bookkeeping."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.restores = 0  # of the current snapshot
        self.clean_since = 0  # clean steps since the snapshot or the last rollback


class Rollbacks:
    """When to take the rollback snapshots and whether a rollback may restore one: one snapshot per optimizer
    (keyed by the optimizer, holding exactly its parameters), taken every ``every`` clean steps of that optimizer and
    only of a state checked finite; at most ``max_rollbacks`` restores of the same snapshot without ``every`` clean
    steps in between."""

    def __init__(self, every: int, max_rollbacks: int) -> None:
        self.every, self.max_rollbacks = every, max_rollbacks
        self._slots: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Slot] = weakref.WeakKeyDictionary()

    @property
    def due(self) -> bool:
        """Whether some optimizer's snapshot is due (or none was taken yet): a caller that checks the state finite
        before :meth:`clean_step` checks it then. Use :meth:`due_for` to ask about one optimizer."""
        return not self._slots or any(self._due(slot) for slot in self._slots.values())

    def due_for(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer``'s snapshot is due at its next clean step."""
        slot = self._slots.get(optimizer)
        return slot is None or self._due(slot)

    def snapshot(self, optimizer: torch.optim.Optimizer) -> Snapshot | None:
        """``optimizer``'s snapshot, if one was taken."""
        slot = self._slots.get(optimizer)
        return slot.snapshot if slot is not None else None

    def _due(self, slot: _Slot) -> bool:
        return slot.snapshot is None or slot.clean_since >= self.every

    def clean_step(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        checked: bool = True,
    ) -> None:
        """A clean step of ``optimizer``: when its snapshot is due, keep this state as the snapshot, if it is finite.

        Args:
            checked: the caller checked this step's state (weights, buffers, ``optimizer``'s state) finite whenever
                :attr:`due` said so (NaNGuard). ``False``: the state is checked here, exactly, when a snapshot is due
                (:func:`~lightning_gradwatch.guards._nonfinite.state_is_finite`, one host read at the snapshot cadence); a
                non-finite state is not kept, and the previous snapshot stays.
        """
        was_due = self.due  # what a caller that checks when due was told
        slot = self._slots.get(optimizer)
        if slot is None:
            slot = self._slots[optimizer] = _Slot()
        stale = slot.snapshot is not None and not _same_params(slot.snapshot.params, params)
        if self._due(slot) or stale:  # stale: the optimizer's parameters changed (a backbone unfrozen): take anew
            if not (checked and was_due) and not _state_is_finite(module, optimizer):
                return  # a NaN must never become the state to go back to: keep the last snapshot
            others = [o for o in [*_trainer_optimizers(module), *self._slots] if o is not optimizer]
            slot.snapshot = Snapshot.take(module, params, optimizer, reuse=slot.snapshot, others=others)
            slot.restores = slot.clean_since = 0
        slot.clean_since += 1

    def restore(self, module: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> bool:
        """Roll ``optimizer``'s parameters back to its snapshot; ``False`` (nothing restored) when there is none or it
        was restored too often. The next snapshot needs ``every`` clean steps after this rollback: a fault that keeps
        coming back sooner exhausts ``max_rollbacks``.

        Raises:
            RuntimeError: ``params`` are not the parameters of ``optimizer``'s snapshot.
        """
        slot = self._slots.get(optimizer)
        if slot is None or slot.snapshot is None or slot.restores >= self.max_rollbacks:
            return False
        slot.snapshot.restore(module, params, optimizer)
        slot.restores += 1
        slot.clean_since = 0
        return True

    def restore_holding(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        poisoned: list[str],
        held: list[str],
        optimizers: list[torch.optim.Optimizer],
    ) -> list[int] | None:
        """Roll ``optimizer`` back, and every other of the Trainer's ``optimizers`` that steps one of the ``poisoned``
        weights ``optimizer`` does not hold (``held``: its parameter names): a GAN's discriminator weight poisons
        the generator's loss, and only the discriminator's snapshot repairs it. Returns the indices of the other
        optimizers restored, or ``None`` when a poisoned weight is in no optimizer's snapshot (a frozen weight) or
        a snapshot cannot be restored."""
        holders: list[tuple[int, torch.optim.Optimizer, list[nn.Parameter]]] = []
        missing = set(poisoned) - set(held)
        for i, other in enumerate(optimizers):
            if missing and other is not optimizer:
                index = OptimizerParams.of(module, other)
                if missing & set(index.names):
                    holders.append((i, other, index.params))
                    missing -= set(index.names)
        if missing or not self.restore(module, params, optimizer):
            return None  # a weight no optimizer holds is in no snapshot: a rollback cannot repair it
        for _, other, other_params in holders:
            if not self.restore(module, other_params, other):
                return None
        return [i for i, _, _ in holders]


def _state_is_finite(module: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    from lightning_gradwatch.guards._nonfinite import (
        state_is_finite,  # it names its findings with this module's helpers
    )

    return state_is_finite(module, optimizer)


def _trainer_optimizers(module: nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizers of the Trainer ``module`` (a LightningModule) is attached to; none for a plain module."""
    trainer = getattr(module, "_trainer", None)
    return list(getattr(trainer, "optimizers", None) or [])
