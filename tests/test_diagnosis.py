"""What real runs die of, diagnosed (issue 11): each failure scenario of tests/failure_models.py, trained as a
user would (``GradWatch()`` at its defaults, the Trainer logging every 50 steps), is named, where it began, within
50 steps of its onset."""

from __future__ import annotations

from pathlib import Path

from lightning_gradwatch import GradWatch
from lightning_gradwatch.diagnosis.health_report import summarize
from tests import failure_models as fm
from tests.distributed import run_ddp_script


def kinds(watch: GradWatch, severity: str = "warning") -> dict[str, list[tuple[str, int]]]:
    found: dict[str, list[tuple[str, int]]] = {}
    for a in watch.alerts:
        if a.severity == severity:
            found.setdefault(a.kind, []).append((a.name, a.step))
    return found


def test_a_collapsed_network_is_named_with_its_stopped_layers_and_its_cause_first(tmp_path: Path) -> None:
    watch = GradWatch()
    fm.fit(fm.collapsed_cnn(seed=0), 60, [watch], tmp_path)
    found = kinds(watch)
    stopped = dict(found["stopped_layer"])
    assert set(stopped) == {"net.conv1", "net.conv2", "net.fc1"} and max(stopped.values()) <= 50
    assert {"net.conv2", "net.fc1"} <= {n for n, step in found["dead_neurons"] if step <= 50}
    # the blow-up at step 1 began first: the report lists it first, as the cause
    first = summarize(watch.alerts)[0]
    assert first.kind in ("exploding_gradient", "gradient_spike") and first.first_step <= 1


def test_a_layer_dead_from_the_start_is_reported_in_a_short_run(tmp_path: Path) -> None:
    watch = GradWatch()
    fm.fit(fm.dead_layer_mlp(seed=0), 60, [watch], tmp_path)
    [(name, step)] = kinds(watch)["dead_neurons"]
    assert name == "net.fc2" and step <= 30


def test_a_layer_dead_on_every_ddp_rank_is_reported_in_60_steps(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("ddp_dead_layer.py", tmp_path, "60")
    dead = [[(a["name"], a["step"]) for a in r["alerts"] if a["kind"] == "dead_neurons"] for r in (rank0, rank1)]
    assert dead[0] == dead[1] and [n for n, _ in dead[0]] == ["net.fc2"] and dead[0][0][1] <= 30


def test_units_killed_mid_run_are_reported_within_50_steps(tmp_path: Path) -> None:
    watch = GradWatch()
    module = fm.unit_kill_mlp(seed=0, kill_steps=10**9, kill_lr=1.0, scale=1.0, shift=0.0)  # lr jumps at step 80
    fm.fit(module, 160, [watch], tmp_path)
    onset = fm.at_least_from(module.trace.dead["net.fc2"], 0.3)
    assert onset is not None
    reported = [a.step for a in watch.alerts if a.kind == "dead_neurons" and a.name == "net.fc2"]
    assert reported and onset < reported[0] <= onset + 50


def test_an_overflowing_forward_pass_is_named_where_it_began(tmp_path: Path) -> None:
    watch = GradWatch()
    fm.fit(fm.overflow_mlp(seed=0, gain=10.0), 5, [watch], tmp_path)
    [alert] = watch.alerts
    assert alert.kind == "non_finite" and alert.cause == "exploding_activations"
    assert "grow about x9.7 per layer from 'net.0' and overflow at 'net.76'" in alert.message
    assert summarize(watch.alerts)[0].title == "Exploding activations"


def test_under_torch_compile_the_overflow_is_named_the_same_and_its_replay_compiles_nothing(tmp_path: Path) -> None:
    """The replay of the failing forward pass runs as eager code: its hooks fire, and no_grad does not make dynamo
    compile the model again on the fault path (38 more graphs here; minutes with inductor on a big model)."""
    import torch
    from torch._dynamo.utils import counters

    def graphs(callbacks: list[GradWatch], name: str) -> int:
        torch._dynamo.reset()
        counters.clear()
        module = fm.overflow_mlp(seed=0, gain=10.0)
        module.net = torch.compile(module.net, backend="eager")
        fm.fit(module, 1, list(callbacks), tmp_path / name)
        return int(counters["stats"]["unique_graphs"])

    watch = GradWatch()
    assert graphs([watch], "watched") == graphs([], "bare")
    [alert] = watch.alerts
    assert alert.kind == "non_finite" and alert.cause == "exploding_activations"
    assert "grow about x9.7 per layer from 'net.0' and overflow at 'net.76'" in alert.message


def test_vanishing_in_a_deep_plain_tanh_network_is_judged_against_the_layers_nearest_the_loss(tmp_path: Path) -> None:
    watch = GradWatch()
    fm.fit(fm.deep_tanh_cnn(seed=0), 60, [watch], tmp_path)
    assert kinds(watch)["vanishing_gradient"] == [("net.0", 49)]


def test_an_explosion_between_logging_steps_is_reported_as_the_cause_and_the_first_step_is_clipped(
    tmp_path: Path,
) -> None:
    watch, updates = GradWatch(), fm.UpdateRecorder()
    module = fm.exploding_rnn(seed=0)
    fm.fit(module, 60, [watch, updates], tmp_path)
    assert module.trace.global_norm[0] > 1e6  # the blow-up happens at step 0 ...
    assert updates.norms[0] is not None and updates.norms[0] <= 1e3 * 1.001  # ... but reaches the weights clipped
    assert module.net.saturation[1] < 0.5  # instead of 99.9% saturated at once
    exploding = next(a for a in watch.alerts if a.kind == "exploding_gradient")
    assert exploding.onset == 0 and exploding.step == 49 and exploding.severity == "warning"
    assert summarize(watch.alerts)[0].first_step == 0  # listed first: the cause
