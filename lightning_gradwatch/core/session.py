"""The per-Trainer session: what the gradwatch callbacks of one Trainer share, and the one dispatch of each step.

Every gradwatch callback of a Trainer reaches the same :class:`Session` through :func:`session_of`. It holds

- the members (the Trainer's gradwatch callbacks, those inside ``GradWatch()`` expanded), in the Trainer's order,
  and who leads (runs the shared work of a hook once) and who closes (sends the step's one metrics row);
- the step dispatch: one :class:`~lightning_gradwatch._step.StepGradients` per optimizer step, built from the
  optimizer's parameter groups as they are at that step, handed to every member in ``hook_order``;
- the shared step state: the loss trace, the one host read a step makes (:class:`SharedRead`) and the metrics row
  of the logging step.

What belongs to a model rather than to a run stays with the model: its one activation probe (the hooks on it, which
a second Trainer fitting the same model must share, not double) and what its buffers hold by design
(:mod:`~lightning_gradwatch.guards._buffer_baseline`).

The session lives on the Trainer it serves (no module-level registry), is rebuilt empty in a process it is copied
to (``ddp_spawn`` pickles the Trainer), and asks members for what they can do, never for their class: whether one
makes the host read on every step (:attr:`~lightning_gradwatch.core.callback.GradwatchCallback.reads_every_step`),
whether one stopped the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from lightning_gradwatch._distributed import is_sharded
from lightning_gradwatch._loss_trace import LossTrace
from lightning_gradwatch._params import OptimizerParams
from lightning_gradwatch._reporting import MetricsRow
from lightning_gradwatch._shared_read import SharedRead
from lightning_gradwatch._step import StepGradients

if TYPE_CHECKING:
    from lightning_gradwatch.core.callback import GradwatchCallback

_SESSION_ATTR = "_lightning_gradwatch_session"


class Session:
    """What the gradwatch callbacks of one Trainer share. Reach it with :func:`session_of`."""

    def __init__(self) -> None:
        self.shared_read = SharedRead()
        self.loss_trace = LossTrace()
        self.metrics = MetricsRow()
        self._members_of: tuple[int, ...] = ()  # ids of the Trainer's callbacks the members were found in
        self._members: list[GradwatchCallback] = []
        self._optimizer_params: dict[int, OptimizerParams] = {}  # id(optimizer) -> its parameters, this fit
        self._last_step: dict[int, int] = {}  # id(optimizer) -> the global step last dispatched

    def __reduce__(self) -> tuple[type[Session], tuple[()]]:
        return Session, ()  # per process: a copied Trainer starts with an empty session

    # -- members -----------------------------------------------------------------------------------------------
    def members(self, trainer: pl.Trainer) -> list[GradwatchCallback]:
        """The Trainer's gradwatch callbacks in list order, with those inside a bundle (``GradWatch``) expanded."""
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set in Trainer.__init__, undeclared
        key = tuple(map(id, callbacks))
        if key != self._members_of:  # the list changed (model callbacks attached at fit): find them again
            self._members_of, self._members = key, _members(callbacks)
        return self._members

    def forget_members(self) -> None:
        """Find the members again at the next hook (a fit starts: its model's callbacks are attached)."""
        self._members_of = ()

    def leads(self, trainer: pl.Trainer, callback: GradwatchCallback) -> bool:
        """Whether ``callback`` runs a hook's shared work: the first member."""
        members = self.members(trainer)
        return bool(members) and members[0] is callback

    def closes(self, trainer: pl.Trainer, callback: GradwatchCallback) -> bool:
        """Whether ``callback`` is the last member to see a hook: it sends the step's one metrics row."""
        members = self.members(trainer)
        return bool(members) and members[-1] is callback

    def reads_every_step(self, trainer: pl.Trainer) -> bool:
        """Whether some member makes the step's host read on every step (values posted to it are read each step)."""
        return any(member.reads_every_step for member in self.members(trainer))

    def stopped_by_gradwatch(self, trainer: pl.Trainer) -> bool:
        """Whether a member stopped this fit (a guard's halt): what the others have not judged yet stays unjudged."""
        return any(member.stopped_this_fit for member in self.members(trainer))

    # -- the run -----------------------------------------------------------------------------------------------
    def start_fit(self) -> None:
        """A new fit: a new loss trace, and optimizers indexed afresh (a new fit may bring new ones)."""
        self.loss_trace.reset()
        self._optimizer_params.clear()
        self._last_step.clear()

    def dispatch_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Build the step's gradients once and run every member's step work on them, in ``hook_order``."""
        key = id(optimizer)
        index = self._optimizer_params.get(key)
        if index is None or not index.matches(optimizer):
            # new, or its parameter groups changed (BaseFinetuning unfreezing a backbone): every callback indexes
            # the groups as they are now, and whatever was derived from the old index (layers, positions) goes with it
            index = self._optimizer_params[key] = OptimizerParams.of(pl_module, optimizer, sharded=is_sharded(trainer))
        # a closure optimizer (LBFGS) runs this hook once per closure evaluation: count the step once
        repeat = self._last_step.get(key) == trainer.global_step
        self._last_step[key] = trainer.global_step
        step = StepGradients.of(trainer, optimizer, index, repeat=repeat)
        for member in sorted(self.members(trainer), key=lambda cb: cb.hook_order):
            member._before_optimizer_step(trainer, pl_module, optimizer, step)


def session_of(trainer: Any) -> Session:
    """The Trainer's session, made on first use."""
    session = trainer.__dict__.get(_SESSION_ATTR)
    if session is None:
        session = Session()
        setattr(trainer, _SESSION_ATTR, session)
    return session


def _members(callbacks: list[Any]) -> list[GradwatchCallback]:
    from lightning_gradwatch.core.callback import GradwatchCallback  # the class that imports this module

    found: list[GradwatchCallback] = []
    for callback in callbacks:
        if isinstance(callback, GradwatchCallback):
            found.append(callback)
        elif isinstance(getattr(callback, "gradwatch_callbacks", None), list):
            found.extend(callback.gradwatch_callbacks)
    return found
