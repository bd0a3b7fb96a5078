"""The user-mistake scenarios still make their mistake, and their twins are still healthy: checks of the raw truth
only (what the tensors did, from ``module.trace``), never of what gradwatch says, so they hold before and after
the detectors change."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from lightning_gradwatch import NaNGuard
from tests.mistakes import scenarios as sc


def _fit(name: str, broken: bool, tmp_path: Path, variant: str | None = None, callbacks: tuple = ()) -> sc.Scenario:
    scenario = sc.build(name, broken, variant)
    sc.fit(scenario, list(callbacks), tmp_path)
    return scenario


def _tail(values: list[float], k: int = 20) -> float:
    return statistics.mean(values[-k:])


def test_every_scenario_builds_both_ways_where_it_has_a_way() -> None:
    for name in sc.SCENARIOS:
        assert sc.variants(name, broken=False), name
        if name in sc.HEALTHY_ONLY:
            with pytest.raises(ValueError, match="healthy run only"):
                sc.build(name, broken=True)
        else:
            assert sc.build(name, broken=True).broken


def test_lr_too_high_adam(tmp_path: Path) -> None:
    loss = _fit("lr_too_high_adam", True, tmp_path).module.trace.loss
    assert max(loss[1:4]) > 1.6 * loss[0]  # nearly doubles within 3 steps
    assert _tail(loss) > 3.5  # then sits near the uniform prediction, ln(64) = 4.16
    assert _tail(_fit("lr_too_high_adam", False, tmp_path).module.trace.loss) < 2.0


def test_lr_too_high_sgd(tmp_path: Path) -> None:
    loss = _fit("lr_too_high_sgd", True, tmp_path).module.trace.loss
    first_nan = next(i for i, v in enumerate(loss) if math.isnan(v))
    assert 6.5 < loss[0] < 7.5 and max(loss[:first_nan]) > 1e10
    healthy = _fit("lr_too_high_sgd", False, tmp_path).module.trace.loss
    assert all(math.isfinite(v) for v in healthy) and _tail(healthy, 10) < healthy[0]


def test_deep_sigmoid_30_underflows_to_exact_zero(tmp_path: Path) -> None:
    trace = _fit("deep_sigmoid_30", True, tmp_path).module.trace
    assert sum(v[0] == 0.0 for v in trace.layer_norm.values()) >= 5  # the first layers, at step 0
    assert set(trace.layer_norm["net.0"]) == {0.0}  # the first, on every step
    assert _tail(trace.loss) > 1.3  # ln(4) = 1.386: it learns nothing
    healthy = _fit("deep_sigmoid_30", False, tmp_path).module.trace
    assert all(v != 0.0 for values in healthy.layer_norm.values() for v in values)
    assert _tail(healthy.loss) < 1.1


@pytest.mark.parametrize(("name", "variant"), [("layer_not_in_optimizer", None), ("detach_in_forward", "detach")])
def test_part_of_the_model_never_moves(tmp_path: Path, name: str, variant: str | None) -> None:
    scenario = sc.build(name, True, variant)
    part = scenario.module.net.head if name == "layer_not_in_optimizer" else scenario.module.net.encoder
    before = [p.detach().clone() for p in part.parameters()]
    sc.fit(scenario, [], tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, part.parameters(), strict=True))
    norms = scenario.module.trace.layer_norm
    if name == "layer_not_in_optimizer":
        assert all(v and v > 0 for v in norms["net.head.0"])  # it has gradients, they are never applied
    else:
        assert set(norms["net.encoder.0"]) == {None}  # no gradient at all


def test_no_grad_variant_cuts_the_graph_too(tmp_path: Path) -> None:
    assert set(_fit("detach_in_forward", True, tmp_path, "no_grad").module.trace.layer_norm["net.encoder.0"]) == {None}


def test_grads_never_reset(tmp_path: Path) -> None:
    trace = _fit("grads_never_reset", True, tmp_path).module.trace
    assert trace.global_norm[-1] > 50 * trace.global_norm[0] and trace.loss[-1] > 5 * trace.loss[0]
    for variant in ("", "accumulate_4"):
        healthy = _fit("grads_never_reset", False, tmp_path, variant).module.trace
        assert max(healthy.global_norm) < 5 and _tail(healthy.loss, 10) < 0.9 * healthy.loss[0], variant


def test_fp16_without_scaling_flushes_most_gradients(tmp_path: Path) -> None:
    scenario = sc.build("fp16_without_scaling", True)
    flushed = sc.fp16_underflow(
        scenario.module.net, scenario.module.loss_fn, tuple(next(iter(scenario.train_dataloader)))
    )
    assert flushed[""] > 0.8 and flushed["fc1"] == 1.0
    sc.fit(scenario, [], tmp_path)
    assert min(scenario.module.trace.zero_fraction) > 0.8
    assert max(_fit("fp16_without_scaling", False, tmp_path, "bf16-true").module.trace.zero_fraction) == 0.0


def test_unnormalised_inputs_saturate_from_the_start(tmp_path: Path) -> None:
    assert _fit("unnormalised_inputs", True, tmp_path).module.trace.saturation["net.1"][0] > 0.9
    assert max(_fit("unnormalised_inputs", False, tmp_path).module.trace.saturation["net.1"]) < 0.05


def test_healthy_runs_that_look_odd(tmp_path: Path) -> None:
    tiny = _fit("tiny_loss", False, tmp_path).module.trace.loss
    assert all(math.isfinite(v) for v in tiny) and min(tiny) < 1e-4
    gru = _fit("gru_plateau", False, tmp_path).module.trace
    jumps = [gru.global_norm[i] / statistics.median(gru.global_norm[i - 10 : i]) for i in range(10, len(gru.loss))]
    assert max(jumps) >= 5 and _tail(gru.loss, 50) < 0.95 * gru.loss[0]


def test_nan_loss_stuck(tmp_path: Path) -> None:
    # a guard that skips and never gives up: the raw truth of all 120 steps (the default halts it as stuck)
    guard = NaNGuard(action="skip", max_consecutive_faults=1000)
    loss = _fit("nan_loss_stuck", True, tmp_path, callbacks=(guard,)).module.trace.loss
    assert [i for i, v in enumerate(loss) if math.isnan(v)] == list(range(10, 70))
    assert all(math.isfinite(v) for v in _fit("nan_loss_stuck", False, tmp_path).module.trace.loss)
