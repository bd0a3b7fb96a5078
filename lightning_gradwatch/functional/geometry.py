"""Gradient-geometry math: shattered gradients and block-Jacobian spectra, as pure functions on tensors.

- Gradient coherence (Balduzzi et al. 2017, "The shattered gradients problem"): the cosine between the gradients
  of the same output projection taken at an input and at a nearby point. Smooth networks keep it near 1; in a deep
  plain ReLU network it falls towards 0, the gradients at neighbouring points looking like white noise.
- Block-Jacobian spectrum (Saxe et al. 2014; Pennington, Schoenholz and Ganguli 2017, dynamical isometry): the root
  mean squared singular value of a block's input-output Jacobian from random vector-Jacobian products, and its
  largest singular value from power iteration. No Jacobian is materialised.

No Lightning and no host syncs here: every result stays a device tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "gain_product",
    "gradient_coherence",
    "relative_perturbation",
    "row_cosine",
    "segment_spectrum",
]

_TINY = 1e-30


def _rows(t: Tensor) -> Tensor:
    """``t`` as a float32 matrix with one row per entry of its leading (sample) dimension."""
    t = t.detach().to(torch.float32)
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def relative_perturbation(h: Tensor, direction: Tensor, radius: float) -> Tensor:
    """A perturbation of ``h``, row by row (along the leading dimension): the part of ``direction`` (e.g. Gaussian
    noise) orthogonal to the row, scaled to norm ``radius * ||h_row||``. ``h + relative_perturbation(h, u, r)``
    lies at relative distance ``r``, at an angle ``atan(r)`` from ``h``."""
    rows = _rows(h)
    u = _rows(direction)
    # orthogonal to each row: a pure rescaling would be invisible to a positively homogeneous network (a
    # bias-free ReLU net), whose gradients only change with the input's direction
    radial = (u * rows).sum(dim=1, keepdim=True) / rows.pow(2).sum(dim=1, keepdim=True).clamp_min(_TINY)
    u = u - radial * rows
    scale = radius * rows.norm(dim=1, keepdim=True) / u.norm(dim=1, keepdim=True).clamp_min(_TINY)
    return (u * scale).reshape(h.shape).to(h.dtype)


def row_cosine(a: Tensor, b: Tensor) -> Tensor:
    """The cosine between ``a`` and ``b`` per row (per sample along the leading dimension), as float32.

    A row where either side is zero (no gradient at all) has cosine 0: nothing coherent flows there.
    """
    x, y = _rows(a), _rows(b)
    dot = (x * y).sum(dim=1)
    norms = x.norm(dim=1) * y.norm(dim=1)
    return torch.where(norms > 0, dot / norms.clamp_min(_TINY), torch.zeros_like(dot))


def gradient_coherence(a: Tensor, b: Tensor) -> Tensor:
    """The mean over samples of the cosine between two gradients taken at nearby points (0-dim float32).

    Near 1: the gradient field is smooth at that scale (a shallow or residual network). Near 0: the gradients
    at neighbouring points are unrelated - shattered (Balduzzi et al. 2017).
    """
    return row_cosine(a, b).mean()


def segment_spectrum(
    output: Tensor, block_input: Tensor, power_iterations: int = 5, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The Jacobian spectrum of ``output`` with respect to ``block_input`` along the autograd graph that links
    them: ``(gain, sigma_max)``, 0-dim float32. The graph must be kept (nothing here frees it).

    ``gain`` is ``sqrt(||J^T u||^2 / ||u||^2)`` for a Gaussian ``u`` in the output space: an estimate of the root
    mean squared singular value of the Jacobian ``J`` (counted over the output dimensions), i.e. the factor by
    which the segment scales the norm of a gradient passing back through it. One vector-Jacobian product over the
    whole tensor: with one sample per leading index the Jacobian is block-diagonal and the estimate pools them.

    ``sigma_max`` is the largest singular value, from ``power_iterations`` steps of power iteration on ``J^T J``
    started from ``J^T u``: ``J v`` comes from differentiating the (linear) map ``u -> J^T u`` once more (double
    backward), ``J^T z`` from a vector-Jacobian product. It is a lower bound that tightens with more steps; over a
    batch, the largest of the samples' values. ``NaN`` when ``power_iterations`` is 0 or an operation on the path
    has no double backward (e.g. a fused attention kernel: build the graph under the math SDPA backend).

    No Jacobian is materialised. Isometry is ``gain ~ sigma_max ~ 1``.
    """
    if isinstance(power_iterations, bool) or not isinstance(power_iterations, int) or power_iterations < 0:
        raise ValueError(f"`power_iterations` must be an integer >= 0, got {power_iterations!r}.")
    u = torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)
    (w,) = torch.autograd.grad(output, block_input, u, retain_graph=True, allow_unused=True, materialize_grads=True)
    w32 = w.to(torch.float32)
    gain = (w32.pow(2).sum() / u.to(torch.float32).pow(2).sum().clamp_min(_TINY)).sqrt()
    nan = torch.full((), math.nan, device=gain.device)
    if power_iterations == 0:
        return gain, nan
    try:
        probe = torch.zeros_like(output, requires_grad=True)
        # J^T probe, kept as a graph in ``probe``: differentiating it along v gives J v (it is linear in probe)
        (linear,) = torch.autograd.grad(output, block_input, probe, retain_graph=True, create_graph=True)
        v = (w32 / w32.norm().clamp_min(_TINY)).to(w.dtype)
        sigma = nan
        for _ in range(power_iterations):
            (z,) = torch.autograd.grad(linear, probe, v, retain_graph=True)
            sigma = z.to(torch.float32).norm()  # ||J v|| with ||v|| = 1: a Rayleigh lower bound on sigma_max
            (w,) = torch.autograd.grad(output, block_input, z, retain_graph=True)
            w32 = w.to(torch.float32)
            v = (w32 / w32.norm().clamp_min(_TINY)).to(w.dtype)
    except (NotImplementedError, RuntimeError):  # an op on the path without a double backward
        sigma = nan
    return gain, sigma


def gain_product(gains: Sequence[Tensor] | Tensor) -> Tensor:
    """The product of per-block gains (0-dim float64): the factor by which a gradient's norm changes crossing all
    the blocks, if their Jacobians were independent. Well below 1 predicts vanishing, well above exploding."""
    stacked = gains if isinstance(gains, Tensor) else torch.stack([torch.as_tensor(g) for g in gains])
    # float64: 48 blocks of gain 0.1 give 1e-48, below what float32 can hold
    return stacked.to(torch.float64).prod()
