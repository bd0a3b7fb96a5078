"""Learnable synthetic data for the real-model runs: structured enough that every loss falls within a few hundred
steps on CPU, with a fixed seed per split (train and held-out come from the same generator, different seeds)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

_TEACHER_SEED = 1234  # the task (templates, transitions, teachers) is the same for every split


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def class_images(n: int, seed: int, num_classes: int = 10, size: int = 32, noise: float = 2.0) -> TensorDataset:
    """Images of ``num_classes`` smooth colour templates, randomly shifted, under strong pixel noise."""
    g, t = _gen(seed), _gen(_TEACHER_SEED)
    templates = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=t), size=size, mode="bilinear")
    y = torch.randint(num_classes, (n,), generator=g)
    x = templates[y]
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts, strict=True)])
    return TensorDataset(x + noise * torch.randn(x.shape, generator=g), y)


def segmentation_images(n: int, seed: int, num_classes: int = 3, size: int = 64) -> TensorDataset:
    """Noise images with two rectangles each, of a class-specific colour; the mask labels every pixel."""
    g, t = _gen(seed), _gen(_TEACHER_SEED)
    colours = 1.5 * torch.randn(num_classes, 3, 1, 1, generator=t)
    x = 0.7 * torch.randn(n, 3, size, size, generator=g)
    mask = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(2):
            cls = int(torch.randint(1, num_classes, (1,), generator=g))
            h, w = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=g))
            top, left = (int(v) for v in torch.randint(0, size - size // 2, (2,), generator=g))
            mask[i, top : top + h, left : left + w] = cls
    x = x + colours[mask].squeeze(-1).squeeze(-1).permute(0, 3, 1, 2)
    return TensorDataset(x, mask)


def markov_tokens(n: int, seed: int, vocab: int = 64, seq_len: int = 32, successors: int = 4) -> TensorDataset:
    """Token sequences from a sparse random Markov chain (each token has ``successors`` likely successors): the
    loss of a language model falls from ``ln(vocab)`` towards the chain's entropy (about ``ln(successors)``)."""
    g, t = _gen(seed), _gen(_TEACHER_SEED)
    transition = torch.full((vocab, vocab), 1e-3)
    for row in range(vocab):
        nxt = torch.randperm(vocab, generator=t)[:successors]
        transition[row, nxt] = torch.rand(successors, generator=t) + 0.5
    transition /= transition.sum(dim=1, keepdim=True)
    tokens = torch.empty(n, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (n,), generator=g)
    for pos in range(1, seq_len):
        tokens[:, pos] = torch.multinomial(transition[tokens[:, pos - 1]], 1, generator=g).squeeze(1)
    return TensorDataset(tokens)


def bag_of_words(n: int, seed: int, vocab: int = 64, seq_len: int = 32) -> TensorDataset:
    """Token sequences (token 0 is a [CLS] slot at position 0) labelled by the sign of a fixed random linear
    teacher over their token counts; attention masks are all ones."""
    g, t = _gen(seed), _gen(_TEACHER_SEED)
    weights = torch.randn(vocab, generator=t)
    weights[0] = 0.0
    tokens = torch.randint(1, vocab, (n, seq_len), generator=g)
    tokens[:, 0] = 0
    y = (weights[tokens].sum(dim=1) > 0).long()
    return TensorDataset(tokens, torch.ones_like(tokens), y)


def token_tags(n: int, seed: int, vocab: int = 64, seq_len: int = 32, tags: int = 3) -> TensorDataset:
    """Random token sequences, each token tagged by its class (``token % tags``), flipped to the next class where
    its predecessor is even: a token-classification task that needs the embedding and one attention step."""
    tokens = torch.randint(1, vocab, (n, seq_len), generator=_gen(seed))
    labels = tokens % tags
    labels[:, 1:] = (labels[:, 1:] + (tokens[:, :-1] % 2 == 0).long()) % tags
    return TensorDataset(tokens, labels)


def first_step_sequences(
    n: int, seed: int, features: int = 8, seq_len: int = 24, num_classes: int = 4
) -> TensorDataset:
    """Noise sequences whose class is set by their first step alone (a teacher on step 0): a recurrent net must
    carry it to the end, so training sits on a plateau before it learns to (the classic memory task)."""
    g, t = _gen(seed), _gen(_TEACHER_SEED)
    teacher = torch.randn(features, num_classes, generator=t)
    x = torch.randn(n, seq_len, features, generator=g)
    return TensorDataset(x, (x[:, 0] @ teacher).argmax(dim=1))


def binary_shapes(n: int, seed: int, size: int = 16) -> TensorDataset:
    """Binary images (exact 0/1 pixels) of one or two filled rectangles, flattened: a VAE's output sigmoid has to
    saturate to reproduce them, legitimately."""
    g = _gen(seed)
    x = torch.zeros(n, size, size)
    for i in range(n):
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            h, w = (int(v) for v in torch.randint(3, size // 2, (2,), generator=g))
            top, left = (int(v) for v in torch.randint(0, size - 3, (2,), generator=g))
            x[i, top : top + h, left : left + w] = 1.0
    return TensorDataset(x.flatten(1))


RING_MODES = 8
RING_RADIUS = 2.0


def ring_of_gaussians(n: int, seed: int, std: float = 0.05) -> TensorDataset:
    """Points from 8 Gaussians on a circle of radius 2 (the usual 2-D GAN benchmark)."""
    g = _gen(seed)
    angle = 2 * math.pi * torch.randint(RING_MODES, (n,), generator=g).float() / RING_MODES
    centres = RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    return TensorDataset(centres + std * torch.randn(n, 2, generator=g))


def distance_to_ring_modes(points: torch.Tensor) -> torch.Tensor:
    """Mean distance of each point to its nearest ring mode: a GAN's samples move onto the modes as it trains."""
    angle = 2 * math.pi * torch.arange(RING_MODES).float() / RING_MODES
    modes = RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    return torch.cdist(points, modes).min(dim=1).values.mean()
