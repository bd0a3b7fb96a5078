"""2-process DDP: a unit alive only on rank 1's data must not be called dead (tallies reduced across ranks), and
saturation counts are summed over ranks; both ranks reach the same alerts."""

import sys
from dataclasses import asdict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradwatch import DeadNeuronCallback, SaturationCallback
from lightning_gradwatch.functional import alive_units, saturated_count, saturation_bound
from tests.distributed import ddp_strategy, report
from tests.models import IN_FEATURES, NUM_CLASSES, Classifier, trainer_kwargs


class RankData(Classifier):
    """Feature 0 is negative on rank 0 and positive on rank 1."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.clone()
        x[:, 0] = x[:, 0].abs() * (1 if self.global_rank == 1 else -1)
        with torch.no_grad():  # what this rank alone sees
            hidden = self.net[0](x)
            self.local_alive = alive_units(hidden, -1) | getattr(self, "local_alive", torch.zeros(4, dtype=torch.bool))
            mid = self.net[2](F.relu(hidden))
            self.local_saturated = getattr(self, "local_saturated", 0) + int(
                saturated_count(mid, saturation_bound("tanh", 0.01))
            )
        return F.cross_entropy(self(x), y)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    hidden, mid = nn.Linear(IN_FEATURES, 4), nn.Linear(4, 4)
    with torch.no_grad():
        hidden.weight.zero_()
        hidden.weight[0, 0] = 1.0  # unit 0 follows feature 0
        hidden.bias.copy_(torch.tensor([0.0, -1e3, -1e3, 10.0]))  # 1, 2 dead; 3 always alive
        mid.weight.zero_()
        mid.bias.zero_()
        mid.weight[0, 0] = 1e3  # saturates tanh wherever hidden unit 0 fires: on rank 1 only
    dead = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    saturation = SaturationCallback(threshold=0.1, sample_every_n_steps=1, window=3)
    model = RankData(nn.Sequential(hidden, nn.ReLU(), mid, nn.Tanh(), nn.Linear(4, NUM_CLASSES)), lr=0.0)
    trainer = pl.Trainer(
        **trainer_kwargs(out_dir, strategy=ddp_strategy(), devices=2, max_steps=3, callbacks=[dead, saturation])
    )
    trainer.fit(model)
    report(
        out_dir,
        trainer.global_rank,
        {
            "dead_alerts": [asdict(a) for a in dead.alerts],
            "saturation_alerts": [asdict(a) for a in saturation.alerts],
            "local_dead_fraction": 1 - model.local_alive.float().mean().item(),
            "local_saturated": model.local_saturated,
        },
    )
