"""Recurrent models for the tests and benchmarks of gradients through time."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class FirstToken(pl.LightningModule):
    """The label is the first of ``length`` tokens: only a memory reaching all the way back can learn it."""

    def __init__(self, cell: str, length: int = 100, lr: float = 1e-2, radius: float | None = None, **rnn: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 16)
        self.rnn = CELLS[cell](16, 32, batch_first=rnn.pop("batch_first", True), **rnn)
        if radius is not None:  # the recurrent weight scaled to this spectral radius
            with torch.no_grad():
                w = self.rnn.weight_hh_l0
                w.mul_(radius / torch.linalg.eigvals(w).abs().max())
        width = 32 * (2 if self.rnn.bidirectional else 1)
        self.head = nn.Linear(width, 4)
        self.length, self.lr = length, lr

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        if not self.rnn.batch_first:
            out, _ = self.rnn(x.transpose(0, 1))
            return self.head(out[-1])
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        return F.cross_entropy(self(tokens), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 8, (2048, self.length), generator=g)
        return DataLoader(TensorDataset(tokens, tokens[:, 0] % 4), batch_size=32, shuffle=True, generator=g)
