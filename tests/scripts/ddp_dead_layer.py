"""2-process DDP: fc2 of ``dead_layer_mlp`` is dead from the first step on every rank (issue 11, scenario 2).

Usage: ``ddp_dead_layer.py OUT_DIR [STEPS]``. Each rank reports GradWatch's alerts and the truth it measured."""

import sys
from dataclasses import asdict

import torch

from lightning_gradwatch import GradWatch
from tests.distributed import ddp_strategy, report
from tests.failure_models import at_least_from, dead_layer_mlp, fit

if __name__ == "__main__":
    out_dir, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 60
    torch.set_num_threads(1)
    module = dead_layer_mlp(seed=0)
    watch = GradWatch()
    trainer = fit(module, steps, [watch], out_dir, strategy=ddp_strategy(), devices=2)
    report(
        out_dir,
        trainer.global_rank,
        {
            "steps": trainer.global_step,
            "alerts": [asdict(a) for a in watch.alerts],
            "dead_fc2_from": at_least_from(module.trace.dead["net.fc2"], 0.99),
            "fc2_grad_norms": sorted(set(module.trace.grad_norm["net.fc2"])),
        },
    )
