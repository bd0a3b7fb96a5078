"""2-process DDP run of AdaptiveClipping with a spike on rank 0's data only; each rank reports its decisions."""

import sys
from dataclasses import asdict

import lightning.pytorch as pl
import torch

from lightning_gradwatch import AdaptiveClipping
from tests.distributed import ddp_strategy, report
from tests.models import trainer_kwargs
from tests.test_adaptive_clipping import Norms, Spiky

SPIKE_STEP = 20

if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    pre, callback, post = Norms(), AdaptiveClipping(), Norms()
    model = Spiky(spike_step=SPIKE_STEP)
    trainer = pl.Trainer(
        **trainer_kwargs(out_dir, strategy=ddp_strategy(), devices=2, max_steps=30, callbacks=[pre, callback, post])
    )
    # the outlier batch only on rank 0: after the all-reduce both ranks see the same spike
    model.factor = 1000.0 if trainer.global_rank == 0 else 1.0
    trainer.fit(model)
    state = {k: v.tolist() for k, v in callback._stats[0].to_state().items() if v.numel() == 1}
    report(
        out_dir,
        trainer.global_rank,
        {
            "pre_norms": pre.by_step,
            "post_norms": post.by_step,
            "state": state,
            "alerts": [asdict(a) for a in callback.alerts],
        },
    )
