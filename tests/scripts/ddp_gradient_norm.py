"""2-process DDP run of GradientNormLogger; each rank reports its alerts and rank 0 its logged norms."""

import sys
from dataclasses import asdict

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_gradwatch import GradientNormLogger
from tests.distributed import ddp_strategy, report
from tests.models import Classifier, classification_data, mlp, trainer_kwargs

if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    callback = GradientNormLogger(log_every_n_steps=2)
    # rank-dependent data: grads differ before the all-reduce, agree after it
    model = Classifier(mlp(20, act=nn.Sigmoid), data=classification_data(256, seed=0))
    trainer = pl.Trainer(
        **trainer_kwargs(out_dir, strategy=ddp_strategy(), devices=2, max_steps=8, callbacks=[callback])
    )
    trainer.fit(model)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    report(
        out_dir,
        trainer.global_rank,
        {"alerts": [asdict(a) for a in callback.alerts], "last_grad_norm": norm, "history": callback._history},
    )
