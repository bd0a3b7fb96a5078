"""The failure scenarios of issue 11 still reproduce their failure: checks of the raw truth only (what the tensors
did), never of what gradwatch says about it, so they hold before and after the detectors are fixed."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_gradwatch import GradWatch, NaNGuard
from tests import failure_models as fm
from tests.distributed import run_ddp_script

ROOT = Path(__file__).resolve().parents[1]


def test_collapsed_cnn_stops_passing_gradient_to_three_layers(tmp_path: Path) -> None:
    module = fm.collapsed_cnn(seed=0)
    fm.fit(module, 40, [GradWatch()], tmp_path)
    t = module.trace
    assert max(t.global_norm[:5]) > 1e5  # the early blow-up
    for layer in ("net.conv1", "net.conv2", "net.fc1"):
        assert (fm.zero_from(t.grad_norm[layer]) or 99) <= 20, layer  # exactly 0.0 from then on
    assert fm.zero_from(t.grad_norm["net.fc2"]) is None  # fc2's bias still learns
    assert (fm.at_least_from(t.dead["net.conv2"], 0.99) or 99) <= 10


def test_dead_layer_is_dead_from_the_first_step(tmp_path: Path) -> None:
    module = fm.dead_layer_mlp(seed=0)
    fm.fit(module, 20, [GradWatch()], tmp_path)
    assert module.trace.dead["net.fc2"] == [1.0] * 20
    assert set(module.trace.grad_norm["net.fc2"]) == {0.0} and set(module.trace.grad_norm["net.fc1"]) == {0.0}


def test_dead_layer_on_every_ddp_rank(tmp_path: Path) -> None:
    ranks = run_ddp_script("ddp_dead_layer.py", tmp_path, "20")
    assert [(r["dead_fc2_from"], r["fc2_grad_norms"]) for r in ranks] == [(0, [0.0]), (0, [0.0])]


@pytest.mark.parametrize(
    ("kwargs", "watch_kwargs"),
    [({}, {"clipping": None}), (dict(kill_steps=10**9, kill_lr=1.0, scale=1.0, shift=0.0), {})],
    ids=["outlier-unclipped", "lr-jump"],
)
def test_unit_kill_mid_run(tmp_path: Path, kwargs: dict, watch_kwargs: dict) -> None:
    module = fm.unit_kill_mlp(seed=0, **kwargs)
    fm.fit(module, 130, [GradWatch(**watch_kwargs)], tmp_path)
    dead = module.trace.dead["net.fc2"]
    assert max(dead[:80]) < 0.2  # healthy before the kill
    assert 80 <= (fm.at_least_from(dead, 0.3) or 0) <= 95 and dead[-1] >= 0.5


@pytest.mark.parametrize(("gain", "step", "where"), [(3.0, 1, "net.4"), (10.0, 0, "net.76")])
def test_overflow_mlp(tmp_path: Path, gain: float, step: int, where: str) -> None:
    module = fm.overflow_mlp(seed=0, gain=gain)
    fm.fit(module, 5, [GradWatch()], tmp_path)
    t = module.trace
    assert min(t.first_non_finite) == step and t.first_non_finite[step] == where
    norms = [v for n, v in t.act_norm[0].items() if isinstance(module.get_submodule(n), torch.nn.Linear)]
    assert norms[10] / norms[0] > (gain * 0.8) ** 10  # each layer multiplies the activations by about `gain`
    if step == 1:  # finite at step 0, but the gradient is astronomically large
        assert math.isfinite(t.loss[0]) and t.global_norm[0] > 1e18


def test_deep_tanh_cnn_gradient_vanishes_geometrically(tmp_path: Path) -> None:
    module = fm.deep_tanh_cnn(seed=0)
    fm.fit(module, 1, [], tmp_path)
    rms = [v[0] for v in module.trace.grad_rms.values()]
    assert rms[0] < 1e-7 and rms[0] / rms[-1] < 1e-5
    assert rms[0] / statistics.median(rms) > 1e-3  # why the rule of today (1e-3 x the median) misses it
    assert all(a < b for a, b in zip(rms[:-1:3], rms[3::3], strict=False))  # rising towards the head


def test_exploding_rnn_explodes_at_step_zero_then_saturates_without_clipping(tmp_path: Path) -> None:
    module = fm.exploding_rnn(seed=0)
    fm.fit(module, 5, [GradWatch(clipping=None)], tmp_path)
    assert module.trace.global_norm[0] > 1e6 and max(module.trace.global_norm[1:]) < 10
    assert module.net.saturation[0] < 0.1 and min(module.net.saturation[1:]) > 0.99


def test_batchnorm_nan_halts_with_running_statistics_restored(tmp_path: Path) -> None:
    module, watch = fm.batchnorm_nan(seed=0), GradWatch()
    trainer = fm.fit(module, 30, [watch], tmp_path)
    guard = next(cb for cb in watch.gradwatch_callbacks if isinstance(cb, NaNGuard))
    assert trainer.global_step == 16 and guard.halt_checkpoint and os.path.exists(guard.halt_checkpoint)
    assert torch.isfinite(module.net.bn1.running_mean).all()  # the NaN batch's update of them was undone
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the update itself was dropped
    assert fm.non_finite_tensors(guard.halt_checkpoint) == []  # the checkpoint called good is good


def test_unused_nan_weight_gets_no_gradient(tmp_path: Path) -> None:
    module = fm.unused_nan(seed=0, poison_step=3, fault_step=8)
    fm.fit(module, 9, [], tmp_path)
    assert "net.unused" not in module.trace.grad_norm  # no gradient check can ever see it
    assert not torch.isfinite(module.net.unused.weight).any()
    assert all(math.isfinite(v) for v in module.trace.loss[:8]) and math.isnan(module.trace.loss[8])


def test_failure_scenarios_script_runs(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.report_failures", "--only", "nan"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## Summary" in done.stdout and "6a NaN batch + BatchNorm, halt" in done.stdout
