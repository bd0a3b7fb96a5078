"""2-process DDP: only rank 1 gets a NaN batch at step 5; NaNGuard must act on both ranks at the same step.

Usage: ddp_nan_guard.py OUT_DIR ACTION (halt: with a ModelCheckpoint, so the checkpoint on halt is a collective
save; rollback: both ranks restore the same snapshot and train on).
"""

import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_gradwatch import NaNGuard
from tests.distributed import ddp_strategy, report
from tests.models import Classifier, mlp, trainer_kwargs


class NaNOnRankOne(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == 5 and self.global_rank == 1:
            x = x * float("nan")
        return F.cross_entropy(self(x), y)


if __name__ == "__main__":
    out_dir, action = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    guard = NaNGuard(action=action, snapshot_every_n_steps=2)
    checkpoints = ModelCheckpoint(dirpath=Path(out_dir, "ckpts"))
    model = NaNOnRankOne(mlp(2))
    trainer = pl.Trainer(
        **trainer_kwargs(
            out_dir,
            strategy=ddp_strategy(),
            devices=2,
            max_steps=50 if action == "halt" else 12,
            callbacks=[guard, checkpoints],
            enable_checkpointing=True,
        )
    )
    start = time.monotonic()
    trainer.fit(model)
    seconds = time.monotonic() - start
    saved = None
    if guard.halt_checkpoint is not None:
        state = torch.load(guard.halt_checkpoint, weights_only=False)
        saved = {
            "global_step": state["global_step"],
            "finite": all(bool(torch.isfinite(v).all()) for v in state["state_dict"].values()),
        }
    report(
        out_dir,
        trainer.global_rank,
        {
            "global_step": trainer.global_step,
            "seconds": seconds,
            "alerts": [asdict(a) for a in guard.alerts],
            "rollbacks": guard.rollbacks,
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
            "weights": [round(float(p.sum()), 6) for p in model.parameters()],
            "halt_checkpoint": guard.halt_checkpoint,
            "saved": saved,
        },
    )
