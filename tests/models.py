"""Small real models and data for the tests: each trains in seconds on CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

IN_FEATURES = 16
NUM_CLASSES = 4


def classification_data(
    n: int = 512, seed: int = 0, in_features: int = IN_FEATURES, seq_len: int | None = None
) -> TensorDataset:
    """A learnable task: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, seq_len, in_features) if seq_len else (n, in_features)
    x = torch.randn(*shape, generator=g)
    teacher = torch.randn(in_features, NUM_CLASSES, generator=torch.Generator().manual_seed(1234))
    pooled = x.mean(dim=1) if seq_len else x
    y = (pooled @ teacher).argmax(dim=1)
    return TensorDataset(x, y)


def image_data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x.mean(dim=(2, 3)) @ torch.randn(3, NUM_CLASSES, generator=torch.Generator().manual_seed(99))).argmax(1)
    return TensorDataset(x, y)


def mlp(
    depth: int = 3, width: int = 32, act: Callable[[], nn.Module] = nn.ReLU, init_gain: float | None = None
) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = IN_FEATURES
    for _ in range(depth):
        linear = nn.Linear(d, width)
        if init_gain is not None:
            nn.init.normal_(linear.weight, std=init_gain / d**0.5)
        layers += [linear, act()]
        d = width
    layers.append(nn.Linear(d, NUM_CLASSES))
    return nn.Sequential(*layers)


class ResidualMLPBlock(nn.Module):
    """A residual MLP block: two Linears (fc1 can be switched off: its gradient exactly zero from then on)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.fc1_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)) * (1.0 if self.fc1_on else 0.0)
        return x + self.fc2(h)


class DeepResidualMLP(nn.Module):
    """48 blocks of two layers between an input and an output layer: 98 layers."""

    def __init__(self, depth: int = 48, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_FEATURES, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


def resnet(channels: int = 16, blocks: int = 2) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        *[ResidualBlock(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, NUM_CLASSES),
    )


class TinyTransformer(nn.Module):
    def __init__(self, d_model: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)).mean(dim=1))


class TinyLSTM(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(IN_FEATURES, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Classifier(pl.LightningModule):
    """Wraps any network with cross-entropy, an optimizer and a random-teacher dataset."""

    def __init__(
        self,
        net: nn.Module,
        data: TensorDataset | None = None,
        lr: float = 0.05,
        optimizer: str = "sgd",
        batch_size: int = 32,
        hook: Callable[[Classifier, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.data = data if data is not None else classification_data()
        self.lr = lr
        self.optimizer_name = optimizer
        self.batch_size = batch_size
        self.after_backward_hook = hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_after_backward(self) -> None:
        if self.after_backward_hook is not None:
            self.after_backward_hook(self, self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "adam_fused":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.data, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Quiet, fast CPU Trainer settings for tests."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=20,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0),
    )
    kwargs.update(overrides)
    return kwargs


class MemoryLogger(Logger):
    """A Lightning logger that keeps every logged metric in memory: ``history[name] = [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    @override
    def name(self) -> str:
        return "memory"

    @property
    @override
    def version(self) -> int:
        return 0

    @override
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((int(step or 0), float(value)))

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def matching(self, prefix: str) -> dict[str, list[tuple[int, float]]]:
        return {k: v for k, v in self.history.items() if k.startswith(prefix)}
