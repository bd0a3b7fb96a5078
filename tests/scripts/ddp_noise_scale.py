"""2-process DDP runs of GradientNoiseScale at a fixed point (lr=0, batches drawn with replacement, one stream per
rank); each rank reports, per run, its estimate and averaging state and any GradientNoiseScale warning.

Runs: the DDP communication hook without accumulation (per-rank batch 8 against the global 16), the hook with
accumulation (DDP's ``no_sync`` micro-batches: per-rank 16 against 32), and the first micro-batch under DDP with
accumulation (8 against 64); and with a user's communication hook in DDP's one slot, the fallback to the
first micro-batch (8 against 32).
"""

import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lightning_gradwatch import GradientNoiseScale
from lightning_gradwatch.functional import noise_scale_readout
from tests.distributed import ddp_strategy, report
from tests.models import trainer_kwargs
from tests.noise_scale_reference import FixedPoint

RUNS = {
    # name: (source argument, accumulate_grad_batches, expected resolved source, optimizer steps)
    "hook": ("auto", 1, "ddp", 150),
    "hook_no_sync": ("ddp", 2, "ddp", 50),
    "first_micro_batch": ("accumulation", 4, "accumulation", 40),
    "user_hook": ("auto", 2, "accumulation", 50),
}


class UserCommHook(Callback):
    """A user's DDP communication hook, registered before GradientNoiseScale looks (as DDPStrategy(ddp_comm_hook=
    ...) does on GPUs)."""

    def on_fit_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(None, allreduce_hook)


MICRO = 8
DECAY = 0.99

if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    results, caught = {}, []
    for name, (source, accumulate, expected, steps) in RUNS.items():
        pl.seed_everything(0)
        callback = GradientNoiseScale(source=source, ema_decay=DECAY)
        trainer = pl.Trainer(
            **trainer_kwargs(
                f"{out_dir}/{name}",
                strategy=ddp_strategy(),
                devices=2,
                max_steps=steps,
                accumulate_grad_batches=accumulate,
                use_distributed_sampler=False,  # each rank keeps its own sampler with replacement
                callbacks=[UserCommHook(), callback] if name == "user_hook" else [callback],
            )
        )
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.fit(FixedPoint(micro_batch=MICRO))
        caught += [str(w.message) for w in record if "GradientNoiseScale" in str(w.message)]
        results[name] = {
            "source": callback._active,
            "expected_source": expected,
            "accumulate": accumulate,
            "micro": MICRO,
            "steps": steps,
            "decay": DECAY,
            "state": callback._state.tolist(),
            "estimate": noise_scale_readout(callback._state).tolist(),
        }
    report(out_dir, trainer.global_rank, {"runs": results, "warnings": caught})
