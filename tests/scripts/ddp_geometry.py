"""2-process DDP: every rank probes its own probe batch at the same steps, the measurements are averaged with one
all-reduce, so both ranks log (rank zero) and alert the same; each rank's own, unreduced value is reported too."""

import sys

import lightning.pytorch as pl
import torch

from lightning_gradwatch import GradientGeometry
from lightning_gradwatch.geometry._probe import probe_geometry
from tests.distributed import ddp_strategy, report
from tests.geometry_models import plain_mlp
from tests.models import Classifier, trainer_kwargs


class Recording(GradientGeometry):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reported = []

    def _report(self, trainer, coherence, gains, sigmas, square, seconds):
        self.reported.append(coherence)
        super()._report(trainer, coherence, gains, sigmas, square, seconds)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    geometry = Recording(every_n_steps=2)
    model = Classifier(plain_mlp(24), lr=0.0)  # the weights stay put: the local probe below repeats the last one
    trainer = pl.Trainer(
        **trainer_kwargs(out_dir, strategy=ddp_strategy(), devices=2, max_steps=5, callbacks=[geometry])
    )
    trainer.fit(model)
    local = probe_geometry(
        model,
        geometry._blocks,
        lambda: model(geometry._probe_batch[0]),
        radius=geometry.radius,
        power_iterations=geometry.power_iterations,
        generator=torch.Generator().manual_seed(geometry.seed),
    )
    report(
        out_dir,
        trainer.global_rank,
        {
            "reported": geometry.reported,
            "alerts": [a.kind for a in geometry.alerts],
            "local_coherence": local.coherence[0].item(),
        },
    )
