"""The gradient-geometry math on its own, and the published effects it measures on small models at init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradwatch.functional.geometry import (
    gain_product,
    gradient_coherence,
    relative_perturbation,
    row_cosine,
    segment_spectrum,
)
from lightning_gradwatch.geometry._probe import find_blocks, probe_geometry
from tests.geometry_models import plain_mlp, residual_mlp
from tests.models import IN_FEATURES


def test_relative_perturbation_is_orthogonal_and_of_relative_size() -> None:
    h = torch.randn(8, 5, 3)
    delta = relative_perturbation(h, torch.randn(8, 5, 3), 0.3)
    rows, d = h.reshape(8, -1), delta.reshape(8, -1)
    assert torch.allclose(d.norm(dim=1), 0.3 * rows.norm(dim=1), rtol=1e-5)
    # a rescaling of h would be invisible to a bias-free ReLU net: the step is orthogonal to each sample
    assert torch.allclose((d * rows).sum(dim=1), torch.zeros(8), atol=1e-4)
    # even along h itself, what is left is orthogonal (and tiny)
    assert relative_perturbation(h, h, 0.3).abs().max() < 1e-3


def test_cosines_per_sample() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [-1.0, -1.0], [1.0, 0.0], [0.0, 5.0]])
    assert row_cosine(a, b).tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])  # a zero gradient is not coherent
    assert gradient_coherence(a, b).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_coherence(a[:1], b[:1]).dtype == torch.float32


def test_segment_spectrum_of_a_linear_map_matches_its_singular_values() -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 32) / math.sqrt(32)
    singular = torch.linalg.svdvals(weight)
    x = torch.randn(256, 32, requires_grad=True)
    gain, sigma = segment_spectrum(x @ weight.T, x, power_iterations=30, generator=torch.Generator().manual_seed(1))
    assert gain.item() == pytest.approx(singular.pow(2).mean().sqrt().item(), rel=0.02)
    # over a batch the Jacobian is block-diagonal with 256 copies of W: its largest singular value is W's
    assert sigma.item() == pytest.approx(singular.max().item(), rel=0.01)
    assert sigma.item() <= singular.max().item() * (1 + 1e-5)  # a Rayleigh quotient: a lower bound


def test_segment_spectrum_of_an_orthogonal_map_is_isometric_and_a_relu_halves_the_energy() -> None:
    weight = nn.init.orthogonal_(torch.empty(64, 64))
    x = torch.randn(128, 64, requires_grad=True)
    gain, sigma = segment_spectrum(x @ weight.T, x, 5, torch.Generator().manual_seed(0))
    assert gain.item() == pytest.approx(1.0, abs=0.02) and sigma.item() == pytest.approx(1.0, abs=1e-4)
    gain, _ = segment_spectrum(torch.relu(x @ weight.T), x, 0, torch.Generator().manual_seed(0))
    assert gain.item() == pytest.approx(math.sqrt(0.5), abs=0.03)  # half the units pass a gradient


def test_segment_spectrum_without_power_iteration_and_bad_arguments() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    gain, sigma = segment_spectrum(2 * x, x, 0)
    assert gain.item() == pytest.approx(2.0) and math.isnan(sigma.item())
    with pytest.raises(ValueError, match="power_iterations"):
        segment_spectrum(2 * x, x, -1)


def test_gain_product_does_not_underflow() -> None:
    assert gain_product([torch.tensor(0.5), torch.tensor(4.0)]).item() == pytest.approx(2.0)
    tiny = gain_product(torch.full((48,), 0.1))
    assert tiny.item() == pytest.approx(1e-48, rel=1e-6)  # below float32's range


def probe(model: nn.Module, radius: float = 0.3, samples: int = 32, seed: int = 100):
    x = torch.randn(samples, IN_FEATURES, generator=torch.Generator().manual_seed(seed))
    blocks = find_blocks(model)
    assert blocks is not None
    return probe_geometry(
        model, blocks, lambda: model(x), radius=radius, power_iterations=5, generator=torch.Generator().manual_seed(7)
    )


def test_shattered_gradients_plain_relu_decorrelates_with_depth_residual_does_not() -> None:
    """Balduzzi et al. 2017, qualitatively: input-gradient coherence of a plain He-init ReLU MLP falls with depth
    towards white noise; a residual MLP of the same depth keeps it."""
    coherence = {}
    for depth in (4, 24, 48):
        torch.manual_seed(0)
        coherence["plain", depth] = probe(plain_mlp(depth)).coherence[0].item()
        torch.manual_seed(0)
        coherence["residual", depth] = probe(residual_mlp(depth)).coherence[0].item()
    assert coherence["plain", 4] > 0.6
    assert coherence["plain", 24] < 0.4 and coherence["plain", 48] < 0.4
    assert coherence["plain", 4] > coherence["plain", 24] > coherence["plain", 48]
    assert min(coherence["residual", d] for d in (4, 24, 48)) > 0.6


def test_isometry_orthogonal_tanh_against_small_and_large_gaussian_init() -> None:
    """Saxe et al. 2014 / Pennington et al. 2017, qualitatively: a deep tanh net with orthogonal weights keeps block
    gains and largest singular values near 1; a Gaussian init too small shrinks every block, too large grows it."""
    results = {}
    for name, init, gain in (("orthogonal", "orthogonal", 1.0), ("small", "gaussian", 0.8), ("large", "gaussian", 2.0)):
        torch.manual_seed(0)
        result = probe(plain_mlp(24, act=nn.Tanh, init=init, gain=gain))
        square = torch.tensor(result.square)
        results[name] = (result.gain[square], result.sigma_max[square])
    gains, sigmas = results["orthogonal"]
    assert gains.min() > 0.85 and gains.max() < 1.05
    assert (sigmas / gains).max() < 1.2  # singular values concentrated: dynamical isometry
    gains, sigmas = results["small"]
    assert gains.median() < 0.85 and gain_product(gains) < 1e-2
    assert (sigmas / gains).median() > 1.5  # a Gaussian matrix's singular values spread
    gains, _ = results["large"]
    assert gains.median() > 1.1 and gain_product(gains) > 10
