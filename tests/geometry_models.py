"""Models for the GradientGeometry tests: the networks of the papers it reproduces, and healthy ones.

- Balduzzi et al. 2017: a deep plain ReLU MLP (He init) against a residual MLP of the same depth.
- Saxe et al. 2014 / Pennington et al. 2017: a deep tanh MLP with orthogonal init against Gaussian init too small or
  too large.
- Healthy models the alerts must leave alone: a shallow He-init ReLU MLP, a BERT-like post-LN encoder on token ids.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import IN_FEATURES, NUM_CLASSES


def plain_mlp(depth: int, width: int = 64, act: type[nn.Module] = nn.ReLU, init: str = "he", gain: float = 1.0):
    """``depth`` hidden Linear layers (``init``: ``"he"``, ``"orthogonal"`` with ``gain``, or ``"gaussian"`` with
    weight std ``gain / sqrt(fan_in)``), zero biases, then a Linear head: an ``nn.Sequential``."""
    layers: list[nn.Module] = []
    d = IN_FEATURES
    for _ in range(depth):
        linear = nn.Linear(d, width)
        if init == "he":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        elif init == "orthogonal":
            nn.init.orthogonal_(linear.weight, gain=gain)
        else:
            nn.init.normal_(linear.weight, std=gain / math.sqrt(d))
        nn.init.zeros_(linear.bias)
        layers += [linear, act()]
        d = width
    layers.append(nn.Linear(d, NUM_CLASSES))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``x + W2 relu(W1 LayerNorm(x))``, He init: two Linear layers per block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


def residual_mlp(depth: int, width: int = 64) -> nn.Sequential:
    """As many Linear layers as ``plain_mlp(depth)``, in ``depth // 2`` residual blocks."""
    blocks = [ResidualBlock(width) for _ in range(depth // 2)]
    return nn.Sequential(nn.Linear(IN_FEATURES, width), *blocks, nn.LayerNorm(width), nn.Linear(width, NUM_CLASSES))


class BertLike(nn.Module):
    """A small BERT: token and position embeddings, LayerNorm, post-LN GELU encoder layers, N(0, 0.02) init."""

    def __init__(self, vocab: int = 100, d: int = 64, layers: int = 4, seq: int = 16) -> None:
        super().__init__()
        self.tokens, self.positions, self.norm = nn.Embedding(vocab, d), nn.Embedding(seq, d), nn.LayerNorm(d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True, activation="gelu")
            for _ in range(layers)
        )
        self.head = nn.Linear(d, NUM_CLASSES)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device)))
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=mask)
        return self.head(h[:, 0])


def token_data(n: int = 256, seq: int = 16, vocab: int = 100, seed: int = 0) -> Any:
    """Token ids with labels from the first token: dict batches ``{"ids", "mask", "label"}``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.zeros(n, seq, dtype=torch.bool)
    mask[:, -2:] = True  # two padding positions
    return [{"ids": ids[i], "mask": mask[i], "label": ids[i, 0] % NUM_CLASSES} for i in range(n)]
