"""Train a small MLP on synthetic data with the gradwatch callbacks attached, and write a TensorBoard run.

    python examples/train_mlp.py fit --config examples/gradwatch_preset.yaml   # GradWatch(): a healthy run
    tensorboard --logdir runs

Break the network on purpose to see an alert, the report and the charts of a diagnosis: vanishing gradients in a
16-layer sigmoid MLP, with the progress bar on:

    python examples/train_mlp.py fit --config examples/gradwatch_preset.yaml \
        --model.activation sigmoid --model.depth 16 --trainer.enable_progress_bar true

``examples/gradwatch.yaml`` attaches every callback one by one, with their main arguments spelled out.

The script runs torch on one thread unless ``OMP_NUM_THREADS`` says otherwise: a model this small trains several
times faster on one thread than on torch's default of one per core, and far faster on a machine that is busy.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


class DemoMLP(pl.LightningModule):
    """An MLP classifier whose activation is applied functionally (``F.relu`` in ``forward``), as most code does.

    Args:
        depth: number of hidden layers.
        width: hidden units per layer.
        activation: the hidden activation.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        depth: int = 4,
        width: int = 128,
        activation: Literal["relu", "gelu", "tanh", "sigmoid"] = "relu",
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        sizes = [SyntheticData.in_features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.head = nn.Linear(width, SyntheticData.num_classes)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self.activation(layer(x))
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class SyntheticData(pl.LightningDataModule):
    """A learnable classification task: labels from a fixed random two-layer teacher.

    Args:
        samples: number of samples (90% train, 10% validation).
        batch_size: batch size.
    """

    in_features = 32
    num_classes = 10

    def __init__(self, samples: int = 20_000, batch_size: int = 64) -> None:
        super().__init__()
        self.samples = samples
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.samples, self.in_features, generator=g)
        w1 = torch.randn(self.in_features, 64, generator=g)
        w2 = torch.randn(64, self.num_classes, generator=g)
        y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
        n_val = self.samples // 10
        self.train_set, self.val_set = random_split(TensorDataset(x, y), [self.samples - n_val, n_val], generator=g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


def main(args: list[str] | None = None) -> LightningCLI:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a small MLP: one thread is fastest, and does not compete with other work
    return LightningCLI(DemoMLP, SyntheticData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
