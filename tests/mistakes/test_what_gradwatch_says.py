"""What ``GradWatch()`` at its defaults says about each user mistake of ``scenarios.py``, and about its healthy twin.

Each mistake must be named (the right kind, by the step the docs promise); each twin, and each healthy run that
looks like a problem to a naive detector, must stay silent at warning level and not halt. ``docs/mistakes.md``
gives the table these tests hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_gradwatch import GradWatch
from tests.mistakes import scenarios as sc

#: scenario (broken) -> (the kind that names it, the latest step it may be named at, GradWatch arguments)
NAMED: dict[str, tuple[str, int, dict[str, Any]]] = {
    "lr_too_high_adam": ("learning_rate", 9, {}),
    "deep_sigmoid_30": ("vanishing_gradient", 49, {}),
    "layer_not_in_optimizer": ("not_in_optimizer", 0, {}),
    "detach_in_forward": ("no_gradient", 19, {}),
    "grads_never_reset": ("gradients_not_reset", 1, {}),
    "fp16_without_scaling": ("gradient_underflow", 49, {}),
    "unnormalised_inputs": ("saturation", 30, {}),
    "nan_loss_stuck": ("non_finite", 10, {"nan_action": "skip"}),
}

BROKEN = [(name, v) for name in sc.SCENARIOS for v in sc.variants(name, True)]
HEALTHY = [(name, v) for name in sc.SCENARIOS for v in sc.variants(name, False)]


def fit(name: str, broken: bool, variant: str, tmp_path: Path, **arguments: Any) -> tuple[GradWatch, Any]:
    watch = GradWatch(**arguments)
    trainer = sc.fit(sc.build(name, broken, variant), [watch], tmp_path)
    return watch, trainer


@pytest.mark.parametrize(("name", "variant"), [b for b in BROKEN if b[0] in NAMED])
def test_each_mistake_is_named_first_with_its_remedy(tmp_path: Path, name: str, variant: str) -> None:
    kind, by, arguments = NAMED[name]
    watch, _ = fit(name, True, variant, tmp_path, **arguments)
    warnings = [a for a in watch.alerts if a.severity == "warning"]
    assert warnings, f"{name}: nothing said"
    first = min(warnings, key=lambda a: (a.began, a.step))
    assert first.kind == kind and first.step <= by, [(a.step, a.kind) for a in warnings]
    assert "Usual remedies" in first.message


@pytest.mark.parametrize(("name", "variant"), HEALTHY)
def test_each_healthy_twin_is_silent_at_warning_level(tmp_path: Path, name: str, variant: str) -> None:
    watch, trainer = fit(name, False, variant, tmp_path)
    assert [f"{a.step} {a.kind}: {a.message[:150]}" for a in watch.alerts if a.severity == "warning"] == []
    assert trainer.global_step == sc.build(name, False, variant).max_steps  # not halted


def test_the_first_named_layer_of_vanishing_is_the_first_layer_and_no_layer_is_reported_apart(tmp_path: Path) -> None:
    watch, _ = fit("deep_sigmoid_30", True, "", tmp_path)
    [vanishing] = [a for a in watch.alerts if a.kind == "vanishing_gradient"]
    assert vanishing.name == "net.0" and "underflow to exactly 0" in vanishing.message
    assert not [a for a in watch.alerts if a.kind == "update_ratio"]


def test_a_run_stuck_on_nan_batches_halts_under_skip_saying_so(tmp_path: Path) -> None:
    watch, trainer = fit("nan_loss_stuck", True, "", tmp_path, nan_action="skip")
    guard = watch.gradwatch_callbacks[0]
    assert guard.stopped_this_fit and trainer.global_step < 40  # 20 faulty steps in a row from step 10
    assert any("stuck" in a.message for a in watch.alerts)
    assert not [a for a in watch.alerts if a.kind == "dead_neurons"]  # NaN batches do not kill units


def test_sgd_at_100x_without_clipping_is_named_before_it_ends_in_nan(tmp_path: Path) -> None:
    watch, _ = fit("lr_too_high_sgd", True, "", tmp_path, clipping=None)
    kinds = [(a.step, a.kind) for a in watch.alerts if a.severity == "warning"]
    lr = next(a for a in watch.alerts if a.kind == "learning_rate")
    nan = next(a for a in watch.alerts if a.kind == "non_finite")
    assert lr.step < nan.step and nan.cause == "divergence", kinds
    assert nan.message.index("diverged") < nan.message.index("surfaced")


def test_unnormalised_inputs_are_named_as_such(tmp_path: Path) -> None:
    watch, _ = fit("unnormalised_inputs", True, "", tmp_path)
    [saturated] = [a for a in watch.alerts if a.kind == "saturation"]
    assert saturated.name == "net.0" and "not normalised" in saturated.message
