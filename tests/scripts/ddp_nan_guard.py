"""2-process DDP: only rank 1 gets a NaN batch at step 5; NaNGuard must stop both ranks at the same step."""

import sys
from dataclasses import asdict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

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
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    guard = NaNGuard()
    model = NaNOnRankOne(mlp(2))
    trainer = pl.Trainer(**trainer_kwargs(out_dir, strategy=ddp_strategy(), devices=2, max_steps=50, callbacks=[guard]))
    trainer.fit(model)
    report(
        out_dir,
        trainer.global_rank,
        {
            "global_step": trainer.global_step,
            "alerts": [asdict(a) for a in guard.alerts],
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
            "weights": [round(float(p.sum()), 6) for p in model.parameters()],
        },
    )
