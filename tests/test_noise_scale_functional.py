"""The noise-scale estimator and its averaging state (lightning_gradwatch.functional.noise_scale)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradwatch.functional import (
    noise_scale_ema_update,
    noise_scale_readout,
    noise_scale_state,
    noise_scale_terms,
)


@pytest.mark.parametrize(("b_small", "b_big"), [(8, 32), (1, 2), (16, 17)])
def test_terms_invert_the_expected_squared_norms(b_small: int, b_big: int) -> None:
    # E|G_B|^2 = |G|^2 + tr(Sigma) / B: fed the expectations, the estimator returns |G|^2 and tr(Sigma) exactly
    grad_sq, trace = 0.3, 12.0
    small = torch.tensor(grad_sq + trace / b_small, dtype=torch.float64)
    big = torch.tensor(grad_sq + trace / b_big, dtype=torch.float64)
    estimate = noise_scale_terms(small, big, b_small, b_big)
    assert [t.dtype for t in estimate] == [torch.float32, torch.float32]
    assert [t.item() for t in estimate] == [pytest.approx(grad_sq, rel=1e-5), pytest.approx(trace, rel=1e-5)]


@pytest.mark.parametrize(("b_small", "b_big"), [(8, 8), (9, 8), (0, 8)])
def test_terms_need_two_different_batch_sizes(b_small: int, b_big: int) -> None:
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_scale_terms(torch.tensor(1.0), torch.tensor(1.0), b_small, b_big)


def test_the_average_is_bias_corrected_and_skips_non_finite_pairs() -> None:
    state = noise_scale_state()
    assert noise_scale_readout(state).isnan().all()  # nothing averaged yet
    state = noise_scale_ema_update(state, torch.tensor(2.0), torch.tensor(10.0), decay=0.9)
    assert noise_scale_readout(state).tolist() == pytest.approx([2.0, 10.0, 5.0])  # one pair: itself
    for bad in (float("nan"), float("inf"), -float("inf")):
        skipped = noise_scale_ema_update(state, torch.tensor(bad), torch.tensor(1.0), decay=0.9)
        assert torch.equal(skipped, state)
        skipped = noise_scale_ema_update(state, torch.tensor(1.0), torch.tensor(bad), decay=0.9)
        assert torch.equal(skipped, state)
    state = noise_scale_ema_update(state, torch.tensor(4.0), torch.tensor(10.0), decay=0.5)
    # weights 0.1 * 0.5 and 0.5 of a total 0.55: the bias-corrected average of 2 and 4
    assert noise_scale_readout(state)[0].item() == pytest.approx((0.05 * 2 + 0.5 * 4) / 0.55)


def test_decay_zero_keeps_only_the_latest_pair() -> None:
    state = noise_scale_state()
    for grad_sq in (1.0, 3.0, 2.0):
        state = noise_scale_ema_update(state, torch.tensor(grad_sq), torch.tensor(8.0), decay=0.0)
    assert noise_scale_readout(state).tolist() == [2.0, 8.0, 4.0]


def test_no_noise_scale_while_the_gradient_is_lost_in_the_noise() -> None:
    state = noise_scale_ema_update(noise_scale_state(), torch.tensor(-0.5), torch.tensor(8.0), decay=0.9)
    grad_sq, trace, b_simple = noise_scale_readout(state).tolist()
    assert grad_sq == pytest.approx(-0.5) and trace == pytest.approx(8.0) and math.isnan(b_simple)
