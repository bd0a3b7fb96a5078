"""LightningModules and training recipes for the real-model runs: any network, its loss, its usual optimizer and
schedule. Every task records its per-step training losses and has a held-out ``quality()`` (lower is better)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tests.real_models.data import distance_to_ring_modes


@dataclass(frozen=True)
class Recipe:
    """An optimizer and a per-step learning-rate schedule.

    ``optimizer``: ``"sgd"`` (momentum, optional Nesterov), ``"adamw"``, ``"adam"``, ``"rmsprop"`` or ``"rmsproptf"``
    (timm's).
    ``schedule``: ``None``, ``"cosine"``, ``"poly"`` (power 0.9, the segmentation recipe), ``"warmup_cosine"`` or
    ``"warmup_linear"`` (the transformers recipe), warm-up over the first ``warmup`` fraction of the steps.
    Weight decay skips 1-D parameters (biases, norms), as the usual transformer and timm recipes do."""

    optimizer: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str | None = None
    warmup: float = 0.0

    def optimizer_for(self, module: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        if self.optimizer == "adam":
            return torch.optim.Adam(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        if self.optimizer == "rmsprop":  # torchvision's MobileNetV3 reference: alpha 0.9, eps 0.0316, momentum 0.9
            return torch.optim.RMSprop(groups, lr=self.lr, alpha=0.9, eps=self.eps, momentum=self.momentum)
        if self.optimizer == "rmsproptf":  # timm's TF-style RMSprop (squares start at one, not zero)
            from timm.optim import RMSpropTF

            return RMSpropTF(groups, lr=self.lr, alpha=0.9, eps=self.eps, momentum=self.momentum)
        raise ValueError(f"unknown optimizer {self.optimizer!r}")

    def factor(self, step: int, total: int) -> float:
        """The learning-rate multiplier at ``step`` of ``total``."""
        warm = int(self.warmup * total)
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if self.schedule in ("cosine", "warmup_cosine"):
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "warmup_linear":
            return 1.0 - progress
        if self.schedule == "poly":
            return (1.0 - progress) ** 0.9
        return 1.0

    def configure(self, module: nn.Module, total_steps: int) -> dict[str, Any]:
        optimizer = self.optimizer_for(module)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.factor(step, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]


class RealTask(pl.LightningModule):
    """A network trained on a dataset with a recipe; ``loss_fn(net, batch)`` gives the loss of a batch.

    Args:
        net: the network (``self.net``).
        loss_fn: the loss of a batch.
        train: training set; ``held_out``: the set ``quality()`` evaluates on.
        recipe: optimizer and schedule; ``batch_size``: training batch size.
    """

    def __init__(
        self, net: nn.Module, loss_fn: LossFn, train: Dataset, held_out: Dataset, recipe: Recipe, batch_size: int
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.train_set, self.held_out = train, held_out
        self.recipe, self.batch_size = recipe, batch_size
        self.losses: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss_fn(self.net, tuple(batch))
        self.losses.append(loss.detach().float())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return self.recipe.configure(self, self.trainer.max_steps)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, self.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
        )

    @torch.no_grad()
    def quality(self) -> float:
        """Mean loss on the held-out set, in eval mode (lower is better)."""
        was_training = self.training
        self.eval()
        total, count = 0.0, 0
        for batch in DataLoader(self.held_out, 64):
            n = len(batch[0])
            total += float(self.loss_fn(self.net, tuple(batch))) * n
            count += n
        self.train(was_training)
        return total / count

    def loss_curve(self) -> list[float]:
        return torch.stack(self.losses).tolist() if self.losses else []


class VAE(nn.Module):
    """An MLP VAE: ReLU encoder to a Gaussian latent, mirrored ReLU decoder ending in a sigmoid over the pixels.
    The defaults are PyTorch's examples/vae (one hidden layer of 400, latent 20)."""

    def __init__(self, pixels: int = 256, hidden: tuple[int, ...] = (400,), latent: int = 20) -> None:
        super().__init__()
        encoder: list[nn.Module] = []
        for d_in, d_out in zip((pixels, *hidden[:-1]), hidden, strict=True):
            encoder += [nn.Linear(d_in, d_out), nn.ReLU()]
        decoder: list[nn.Module] = []
        widths = (latent, *reversed(hidden))
        for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
            decoder += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder)
        self.mu, self.logvar = nn.Linear(hidden[-1], latent), nn.Linear(hidden[-1], latent)
        self.decoder = nn.Sequential(*decoder, nn.Linear(hidden[0], pixels), nn.Sigmoid())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.decoder(z), mu, logvar


def vae_loss(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Negative ELBO per sample: Bernoulli reconstruction (BCE on the sigmoid output) plus the KL term."""
    (x,) = batch
    recon, mu, logvar = net(x)
    bce = F.binary_cross_entropy(recon, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kl) / len(x)


class GANTask(pl.LightningModule):
    """A 2-D GAN (ReLU MLP generator, LeakyReLU MLP discriminator) with two Adam optimizers (lr 2e-4, betas
    (0.5, 0.999), the DCGAN recipe) in manual optimization: one discriminator and one generator step per batch.

    ``quality()``: mean distance of generated samples to the nearest data mode (lower is better)."""

    def __init__(self, train: Dataset, batch_size: int = 128, latent: int = 8, width: int = 128) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent, self.batch_size, self.train_set = latent, batch_size, train
        self.generator = nn.Sequential(
            nn.Linear(latent, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
        )
        self.discriminator = nn.Sequential(
            nn.Linear(2, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1)
        )
        self.losses: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        (real,) = batch
        fake = self.generator(torch.randn(len(real), self.latent, device=real.device))
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        d_loss = F.binary_cross_entropy_with_logits(
            self.discriminator(real), ones
        ) + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.losses.append(g_loss.detach())
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, self.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
        )

    @torch.no_grad()
    def quality(self) -> float:
        samples = self.generator(torch.randn(2048, self.latent, generator=torch.Generator().manual_seed(7)))
        return float(distance_to_ring_modes(samples))

    def loss_curve(self) -> list[float]:
        return torch.stack(self.losses).tolist() if self.losses else []
