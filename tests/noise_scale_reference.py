"""A fixed point to measure the gradient noise scale at, and its brute-force truth from per-example gradients.

The model trains with ``lr=0`` on a fixed data set sampled with replacement, so the true gradient ``G`` and the
per-example covariance ``Sigma`` stay the same at every step and are known exactly from the per-example gradients
(``torch.func``: ``vmap`` of ``grad``). :func:`estimator_spread` simulates the estimator from those same
per-example gradients, to set a statistical tolerance instead of guessing one.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_gradwatch.functional import (
    noise_scale_ema_update,
    noise_scale_readout,
    noise_scale_state,
    noise_scale_terms,
)

IN_FEATURES = 32
CLASSES = 16  # more classes give more independent directions of noise: a less noisy estimator
EXAMPLES = 2048


def reference_data(seed: int = 3) -> TensorDataset:
    """Labels from a random linear teacher favouring class 0 (60% of the labels): at the untrained start the
    gradient has a strong common direction, so ``B_simple`` (about 34) lies near the batch sizes used, where the
    estimator is most precise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(EXAMPLES, IN_FEATURES, generator=g)
    logits = x @ torch.randn(IN_FEATURES, CLASSES, generator=g)
    logits[:, 0] += 2 * logits.std()
    return TensorDataset(x, logits.argmax(dim=1))


def reference_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, 64), nn.Tanh(), nn.Linear(64, CLASSES))


class FixedPoint(pl.LightningModule):
    """Cross-entropy averaged over the batch; ``lr=0``; batches drawn with replacement (one stream per rank)."""

    def __init__(self, micro_batch: int = 8, seed: int = 1, samples_per_epoch: int = 10**6) -> None:
        super().__init__()
        self.samples_per_epoch = samples_per_epoch
        self.net = reference_net()
        self.data = reference_data()
        self.micro_batch = micro_batch
        self.seed = seed

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + 1000 * self.global_rank + 7 * self.current_epoch)
        sampler = RandomSampler(self.data, replacement=True, num_samples=self.samples_per_epoch, generator=generator)
        return DataLoader(self.data, batch_size=self.micro_batch, sampler=sampler)


def per_example_grads(net: nn.Module | None = None, data: TensorDataset | None = None) -> Tensor:
    """Every example's gradient, flattened: shape ``(examples, parameters)``, float64."""
    net = net if net is not None else reference_net()
    x, y = (data if data is not None else reference_data()).tensors
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1).double()


def true_terms(flat: Tensor) -> tuple[float, float, float]:
    """``(|G|^2, tr(Sigma), B_simple)`` of the data set, exactly (population covariance)."""
    mean = flat.mean(dim=0)
    grad_sq = float(mean.square().sum())
    trace = float((flat - mean).square().sum(dim=1).mean())
    return grad_sq, trace, trace / grad_sq


def estimator_spread(
    flat: Tensor,
    micro_batch: int,
    accumulate: int,
    world: int,
    source: str,
    steps: int,
    decay: float,
    runs: int = 40,
) -> Tensor:
    """The standard deviations of ``estimate / truth`` for ``[|G|^2, tr(Sigma), B_simple]`` after ``steps``
    measurements, simulated from the per-example gradients with the package's own estimator and EMA."""
    truth = torch.tensor(true_terms(flat), dtype=torch.float32)
    ratios = []
    for run in range(runs):
        g = torch.Generator().manual_seed(10_000 + run)
        state = noise_scale_state()
        for _ in range(steps):
            idx = torch.randint(0, len(flat), (world, accumulate, micro_batch), generator=g)
            means = flat[idx].mean(dim=2)  # (world, accumulate, parameters)
            big = means.mean(dim=(0, 1)).square().sum()
            if source == "ddp":
                small, b_small = means.mean(dim=1).square().sum(dim=1).mean(), micro_batch * accumulate
            else:
                small, b_small = means[:, 0].square().sum(dim=1).mean(), micro_batch
            grad_sq, trace = noise_scale_terms(small, big, b_small, world * accumulate * micro_batch)
            state = noise_scale_ema_update(state, grad_sq, trace, decay)
        ratios.append(noise_scale_readout(state) / truth)
    return torch.stack(ratios).std(dim=0)
