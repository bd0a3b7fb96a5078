"""Update-to-weight ratios and exact-zero gradient fractions (lightning_gradwatch.functional.dynamics), against
explicit float64 arithmetic, with real torch optimizers (foreach and fused), fp16/bf16 weights and a GradScaler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_gradwatch.functional import (
    nonzero_counts,
    snapshot_for_update,
    update_norms,
    update_ratios,
    zero_fractions,
)
from lightning_gradwatch.testing import HostReadCounter


def model_and_groups(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[nn.Parameter], Tensor, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    params = list(model.parameters())
    return model, params, torch.tensor([0, 0, 1, 1]), 2  # one group per Linear: weight and bias together


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    x = torch.randn(32, 8, dtype=next(model.parameters()).dtype)
    model(x).float().square().mean().backward()
    optimizer.step()


def reference_ratios(before: list[Tensor], params: list[nn.Parameter], index: Tensor, groups: int) -> Tensor:
    delta = torch.zeros(groups, dtype=torch.float64)
    weight = torch.zeros(groups, dtype=torch.float64)
    for b, p, g in zip(before, params, index.tolist(), strict=True):
        delta[g] += (p.detach().double() - b.double()).square().sum()
        weight[g] += b.double().square().sum()
    return (delta.sqrt() / weight.sqrt()).float()


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True),
    "adagrad_fused": lambda p: torch.optim.Adagrad(p, lr=0.01, fused=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-3),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_ratios_match_float64_arithmetic_for_any_optimizer(name: str) -> None:
    model, params, index, groups = model_and_groups()
    optimizer = OPTIMIZERS[name](params)
    for _ in range(3):  # past the first step: momentum and second moments in play
        train_step(model, optimizer)
    before = snapshot_for_update(params)
    train_step(model, optimizer)
    ratios = update_ratios(before, params, index, groups)
    assert ratios.dtype == torch.float32 and ratios.shape == (groups,)
    assert torch.all(ratios > 0)
    torch.testing.assert_close(ratios, reference_ratios(before, params, index, groups), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_update_ratios_in_low_precision_weights(dtype: torch.dtype) -> None:
    model, params, index, groups = model_and_groups(dtype)
    optimizer = torch.optim.SGD(params, lr=0.05)
    train_step(model, optimizer)
    before = snapshot_for_update(params)
    assert all(b.dtype == dtype for b in before)  # copied as they are: half the memory of a float32 copy
    train_step(model, optimizer)
    ratios = update_ratios(before, params, index, groups)
    assert ratios.dtype == torch.float32 and torch.all(ratios > 0)
    torch.testing.assert_close(ratios, reference_ratios(before, params, index, groups), rtol=1e-3, atol=0)


def test_an_update_lost_to_bf16_rounding_is_a_ratio_of_zero() -> None:
    weight = nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    before = snapshot_for_update([weight])
    with torch.no_grad():
        weight.add_(1e-4)  # below half a bf16 ulp at 1.0 (2**-8): the weights do not change
    assert update_ratios(before, [weight], torch.tensor([0]), 1).item() == 0.0


def test_a_frozen_group_and_a_skipped_step_give_exactly_zero() -> None:
    model, params, index, groups = model_and_groups()
    optimizer = torch.optim.AdamW(
        [{"params": params[:2], "lr": 0.0}, {"params": params[2:], "lr": 1e-3}], fused=True
    )  # requires_grad stays True on the frozen layer: only its lr is 0
    train_step(model, optimizer)
    before = snapshot_for_update(params)
    train_step(model, optimizer)
    ratios = update_ratios(before, params, index, groups)
    assert ratios[0].item() == 0.0 and ratios[1].item() > 0

    # a step the GradScaler skips for overflow (fused optimizers check for inf inside their own step)
    scaler = torch.amp.GradScaler("cpu")
    before = snapshot_for_update(params)
    optimizer.zero_grad()
    scaler.scale(model(torch.randn(4, 8)).sum()).backward()
    params[3].grad[0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert update_ratios(before, params, index, groups).tolist() == [0.0, 0.0]


def test_a_zero_initialised_layer_is_measured_against_its_new_weights() -> None:
    layer = nn.Linear(4, 3)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    before = snapshot_for_update(list(layer.parameters()))
    layer(torch.randn(5, 4)).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    ratios = update_ratios(before, list(layer.parameters()), torch.tensor([0, 0]), 2)  # group 1 has no tensor
    assert ratios.tolist() == [pytest.approx(1.0), 0.0]


def test_snapshot_reuses_memory_and_update_norms_are_per_tensor() -> None:
    _, params, _, _ = model_and_groups()
    first = snapshot_for_update(params)
    with torch.no_grad():
        params[0].add_(1.0)
    second = snapshot_for_update(params, out=first)
    assert [t.data_ptr() for t in second] == [t.data_ptr() for t in first]
    assert all(torch.equal(s, p) for s, p in zip(second, params, strict=True))
    with torch.no_grad():
        params[1].mul_(3.0)
    delta, weight_before, weight_after = update_norms(second, params)
    torch.testing.assert_close(delta[1], 2 * params[1].detach().norm() / 3)
    torch.testing.assert_close(weight_after[1], 3 * weight_before[1])
    assert delta[0].item() == delta[2].item() == delta[3].item() == 0.0
    # consuming the snapshot gives the same norms without allocating the differences
    kept = [t.clone() for t in second]
    consumed = update_norms(second, params, consume_before=True)
    for a, b in zip(consumed, (delta, weight_before, weight_after), strict=True):
        torch.testing.assert_close(a, b)
    assert all(s.data_ptr() == f.data_ptr() for s, f in zip(second, first, strict=True))
    assert not all(torch.equal(s, k) for s, k in zip(second, kept, strict=True))  # consumed, as documented


def test_zero_fractions_per_group() -> None:
    a = torch.tensor([0.0, 1.0, 0.0, 2.0])  # 2 zeros of 4
    b = torch.zeros(6)  # 6 of 6
    c = torch.ones(10, dtype=torch.float16)
    c[:3] = 0  # 3 of 10
    nan = torch.tensor([float("nan"), 0.0])  # NaN is not zero
    fractions = zero_fractions([a, b, c, nan], torch.tensor([0, 0, 1, 2]), 4, torch.tensor([10.0, 10.0, 2.0, 0.0]))
    torch.testing.assert_close(fractions, torch.tensor([0.8, 0.3, 0.5, 0.0]))
    assert nonzero_counts([a, b, c]).tolist() == [2.0, 0.0, 7.0]


def test_zero_counts_of_large_half_precision_tensors_are_exact() -> None:
    # fp16 holds integers exactly up to 2048 only: the count is accumulated in float32
    g = torch.ones(300_000, dtype=torch.float16)
    g[::4] = 0
    assert nonzero_counts([g]).item() == 225_000
    bf = torch.full((50_000,), 1e-30, dtype=torch.bfloat16)  # tiny but representable in bf16: not underflowed
    assert zero_fractions([bf], torch.tensor([0]), 1, torch.tensor([50_000])).item() == 0.0


def test_sparse_gradients_count_unstored_elements_as_zero() -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 4])).sum().backward()
    assert embedding.weight.grad.is_sparse
    assert zero_fractions([embedding.weight.grad], torch.tensor([0]), 1, torch.tensor([30])).item() == pytest.approx(
        0.8
    )


def test_no_host_reads() -> None:
    model, params, index, groups = model_and_groups()
    optimizer = torch.optim.Adam(params, lr=1e-3)
    train_step(model, optimizer)
    numels = torch.tensor([8 * 16 + 16, 16 * 4 + 4])
    counter = HostReadCounter()
    with counter:
        counter.step = 0  # counting
        before = snapshot_for_update(params)
        counter.step = None  # the optimizer's own reads (Adam's step count) are not ours
        train_step(model, optimizer)
        counter.step = 0
        update_ratios(before, params, index, groups)
        zero_fractions([p.grad for p in params], index, groups, numels)
    assert counter.reads.get(0, []) == []
