"""Non-finite checks (lightning_gradwatch.functional.finite): pure tensor functions, no Trainer."""

from __future__ import annotations

import math

import torch

from lightning_gradwatch.functional import any_non_finite, may_be_non_finite, non_finite_mask


def test_exact_mask_and_any() -> None:
    tensors = [torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([1e30, 1e30]), torch.tensor([-math.inf])]
    assert non_finite_mask(tensors).tolist() == [False, True, False, True]
    assert any_non_finite(tensors).item()
    assert not any_non_finite([torch.full((4,), 1e30)]).item()  # large but finite: the max-norm cannot overflow
    assert not any_non_finite([]).item()


def test_exact_checks_handle_half_precision_and_empty_shards() -> None:
    assert not any_non_finite([torch.full((4,), 60000.0, dtype=torch.float16), torch.zeros(0)]).item()
    assert any_non_finite([torch.tensor([1.0, math.inf], dtype=torch.bfloat16)]).item()


def test_screen_never_misses_and_only_overflow_is_a_false_alarm() -> None:
    for bad in (float("nan"), math.inf, -math.inf):
        t = torch.randn(1000)
        t[17] = bad
        assert may_be_non_finite([torch.ones(5), t]).item()
    assert not may_be_non_finite([torch.randn(1000) * 1e10, torch.ones(3, dtype=torch.bfloat16)]).item()
    assert not may_be_non_finite([]).item()
    huge = [torch.full((4,), 1e20)]  # finite, but its square overflows float32
    assert may_be_non_finite(huge).item() and not any_non_finite(huge).item()


def test_checks_do_not_change_their_inputs() -> None:
    t = torch.tensor([1.0, math.nan, 3.0])
    before = t.clone()
    may_be_non_finite([t]), any_non_finite([t]), non_finite_mask([t])
    assert torch.equal(t[[0, 2]], before[[0, 2]]) and t[1].isnan()
