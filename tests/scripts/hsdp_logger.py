"""2-process ModelParallelStrategy fit (gloo, CPU) of GradientNormLogger on an HSDP layout: ``fully_shard`` on the
strategy's 2x1 mesh, so every parameter is replicated along the 2-rank data-parallel dimension (and sharded along a
1-rank one). Each rank reports the full gradients' per-layer norms (``full_tensor()``) of every step; rank 0's
logged norms are read back from TensorBoard by the test."""

import os
import sys
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_gradwatch import GradientNormLogger
from tests.distributed import report
from tests.models import Classifier, classification_data, mlp, trainer_kwargs


class HSDPClassifier(Classifier):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh  # ("data_parallel", "tensor_parallel") = (2, 1): a 2-D mesh is HSDP to fully_shard
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class FullNorms(Callback):
    """Per-layer norms of the full gradients (a collective on every rank), before any gradwatch callback."""

    def __init__(self) -> None:
        self.norms: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        layers: dict[str, list[torch.Tensor]] = {}
        for name, p in pl_module.named_parameters():
            layers.setdefault(name.rpartition(".")[0], []).append(p.grad.full_tensor().flatten())
        self.norms[trainer.global_step] = {k: float(torch.linalg.vector_norm(torch.cat(v))) for k, v in layers.items()}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    full = FullNorms()
    model = HSDPClassifier(mlp(2), data=classification_data(128, seed=0))
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo", timeout=timedelta(seconds=60)
    )
    kwargs = trainer_kwargs(out_dir, strategy=strategy, devices=2, max_steps=4, callbacks=[full, GradientNormLogger()])
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model)
    report(out_dir, trainer.global_rank, {"full": full.norms})
    # as fsdp2_norms.py: every rank done before the group goes, and no interpreter finalization (gloo's teardown)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
