"""Pure activation-health math and the activation classifier, without a Trainer."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradwatch.activations._probe import activation_kind
from lightning_gradwatch.functional import (
    alive_units,
    dead_fractions,
    saturated_count,
    saturation_bound,
    segment_sum,
)


def test_alive_units_over_samples_and_positions() -> None:
    linear_out = torch.tensor([[[-1.0, 2.0, -3.0], [-1.0, -2.0, -3.0]], [[-1.0, -2.0, 0.0], [-1.0, -2.0, -3.0]]])
    assert alive_units(linear_out, -1).tolist() == [False, True, False]  # 0 is not positive
    conv_out = torch.full((2, 3, 4, 4), -1.0)
    conv_out[1, 2, 3, 3] = 0.5
    assert alive_units(conv_out, 1).tolist() == [False, False, True]


def test_alive_units_does_not_track_gradients() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    assert not alive_units(x * 2, -1).requires_grad


def test_segment_sum_and_dead_fractions() -> None:
    # layers of 2, 3 and 1 units end to end
    alive = torch.tensor([True, False, True, True, True, False])
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    assert segment_sum(alive, ids, 3).tolist() == [1.0, 3.0, 0.0]
    assert dead_fractions(alive, ids, torch.tensor([2, 3, 1])).tolist() == [0.5, 0.0, 1.0]


def test_saturation_bounds_and_counts() -> None:
    assert torch.sigmoid(torch.tensor(saturation_bound("sigmoid", 0.01))).item() == pytest.approx(0.99)
    assert math.tanh(saturation_bound("tanh", 0.01)) == pytest.approx(0.99)
    x = torch.tensor([0.0, 2.0, -2.7, 3.0, -10.0])
    count = saturated_count(x, saturation_bound("tanh", 0.01))
    assert count.item() == 3 and count.dtype == torch.float32 and count.dim() == 0
    with pytest.raises(ValueError, match="`kind`"):
        saturation_bound("relu", 0.01)


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "kind"),
    [
        ("relu", (), {}, "relu"),
        ("relu_", (), {}, "relu"),
        ("relu6", (), {}, "relu"),  # F.relu6
        ("leaky_relu", (None, 0.0), {}, "relu"),
        ("leaky_relu", (None,), {"negative_slope": 0.0}, "relu"),
        ("leaky_relu", (None,), {}, None),  # default slope 0.01: units never die
        ("hardtanh", (None, 0.0, 6.0), {}, "relu"),  # nn.ReLU6
        ("hardtanh", (None,), {}, None),  # the real hard-tanh: out of scope
        ("sigmoid", (), {}, "sigmoid"),
        ("tanh_", (), {}, "tanh"),
        ("gelu", (), {}, "gelu"),  # watched for GradientGeometry's histograms only
        ("silu_", (), {}, "silu"),
        ("hardsigmoid", (), {}, None),
    ],
)
def test_activation_kind(name: str, args: tuple, kwargs: dict, kind: str | None) -> None:
    assert activation_kind(name, args, kwargs) == kind
