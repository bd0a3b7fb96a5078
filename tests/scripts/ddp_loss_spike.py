"""2-process DDP: the loss spikes on rank 1 only; LossSpikeGuard(action="skip") must skip the step on both ranks,
and in every action (``log`` too, given as the first argument after the folder) both ranks and the spikes file
written by rank 0 record the same spikes. Given that file (second argument after the action), a rerun without the
spike drops rank 1's recorded batch, found by its fingerprint, on both ranks."""

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_gradwatch import LossSpikeGuard
from lightning_gradwatch._reporting import log_dir
from tests.distributed import ddp_strategy, report
from tests.models import trainer_kwargs
from tests.test_loss_spike_guard import SPIKE, Spiking


class OneRank(Spiking):
    inject = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        spike = self.inject and self.global_step == SPIKE and self.global_rank == 1
        return loss * 50.0 if spike else loss


class Moved(pl.Callback):
    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.moved: bool | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step in (SPIKE, SPIKE + 1):
            now = [p.detach().clone() for p in pl_module.parameters()]
            if trainer.global_step == SPIKE + 1:
                self.moved = not all(torch.equal(a, b) for a, b in zip(self.before, now, strict=True))
            self.before = now


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    action = sys.argv[2] if len(sys.argv) > 2 else "skip"
    skip_batches = sys.argv[3] if len(sys.argv) > 3 else None  # a rerun with the first run's file: no spike made
    guard, moved = LossSpikeGuard(action=action, skip_batches=skip_batches), Moved()
    model = OneRank(spike_steps=())
    model.inject = skip_batches is None
    kwargs = trainer_kwargs(out_dir, strategy=ddp_strategy(), devices=2, max_steps=SPIKE + 3, callbacks=[guard, moved])
    trainer = pl.Trainer(**{**kwargs, "log_every_n_steps": 10})
    trainer.fit(model)
    written = None  # the spikes file, as rank 0 wrote it
    spikes_file = os.path.join(log_dir(trainer), "gradwatch_spikes.json") if trainer.is_global_zero else ""
    if spikes_file and os.path.exists(spikes_file):
        with open(spikes_file) as f:
            written = [s["step"] for s in json.load(f)["spikes"]]
    report(
        out_dir,
        trainer.global_rank,
        {
            "spikes": [s["step"] for s in guard.spikes],
            "moved_at_spike": moved.moved,
            "weights": [float(p.sum()) for p in model.parameters()],
            "file": written,
            "skipped_batches": guard.skipped_batches,
        },
    )
