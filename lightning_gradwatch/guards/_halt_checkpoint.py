"""NaNGuard's halt: the decision, taken at the faulty step, and what follows at the end of its batch: the checkpoint of
the last good state (written only of a finite state, named after the faulty step) and the line saying where it is."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lightning_gradwatch._distributed import all_reduce_max
from lightning_gradwatch._reporting import print_line
from lightning_gradwatch.guards._nonfinite import state_is_finite


def save_halt_checkpoint(trainer: Any, module: nn.Module, totals: Any) -> str:
    """Save the halt checkpoint ``gradwatch-halt-step=N.ckpt`` beside the ModelCheckpoint's files if weights, buffers
    and optimizer state are all finite (every rank agrees first: the save is a collective); returns the sentence
    for the log: where it is and how to resume, or why there is none. Records the path in ``totals``."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if dirpath is None:
        return " No checkpoint was saved (no checkpoint directory is known: add a ModelCheckpoint)."
    poisoned = any(not state_is_finite(module, opt) for opt in trainer.optimizers)
    if all_reduce_max(torch.tensor([float(poisoned)])).tolist()[0] > 0:
        return (
            " No checkpoint was saved: the weights, buffers or optimizer state are already non-finite and no clean "
            "copy of them exists (action='rollback' keeps one)."
        )
    path = os.path.join(dirpath, f"gradwatch-halt-step={totals.halt_step}.ckpt")
    trainer.save_checkpoint(path)
    totals.halt_checkpoint = path
    return (
        f" The last good state (before step {totals.halt_step}'s update) is saved at '{path}'; after fixing the "
        f"cause, resume with trainer.fit(model, ckpt_path={path!r})."
    )


class Halt:
    """A guard's decision to stop the run. :meth:`request` at the faulty step (the Trainer stops; the decision is
    the same on every rank); :meth:`carry_out` at the end of that batch, once the step is over."""

    def __init__(self) -> None:
        self.halted = False  # in this fit
        self.pending: str | None = None  # the reason, until carried out

    def request(self, trainer: Any, reason: str, totals: Any) -> None:
        trainer.should_stop = True
        self.halted, self.pending = True, reason
        totals.halt_step = trainer.global_step

    def carry_out(self, trainer: Any, module: nn.Module, totals: Any, save: bool) -> None:
        """Save the halt checkpoint (when ``save``) and say where it is, or why there is none."""
        reason, self.pending = self.pending, None
        where = (
            save_halt_checkpoint(trainer, module, totals)
            if save
            else " No checkpoint was saved (save_checkpoint_on_halt=False)."
        )
        if trainer.is_global_zero:
            print_line(f"NaNGuard stopped training at step {totals.halt_step}: {reason}.{where}")
