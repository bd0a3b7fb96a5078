"""The benchmark scripts still run: a tiny run of each main one, as a subprocess from the repository root.

These are smoke tests of the scripts, not measurements: the figures live in benchmarks/RESULTS.md. The sync
column of overhead.py is deterministic, so it is checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(out: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_overhead_reports_ratios_and_the_syncs_each_configuration_adds(tmp_path: Path) -> None:
    out = run_script(
        "overhead.py",
        *("--steps", "16", "--rounds", "1", "--warmup", "2", "--log-every-n-steps", "5", "--batch-size", "16"),
        *("--configs", "none,gradient_norm,lightning_grad_norm_recipe,nan_guard", "--logdir", str(tmp_path)),
        tmp_path=tmp_path,
    )
    rows = table_rows(out)
    assert set(rows) == {"none", "gradient_norm", "lightning_grad_norm_recipe", "nan_guard"}
    assert rows["none"][1] == "1.000" and all(float(r[1]) > 0 for r in rows.values())
    # the benchmark MLP has 4 Linear layers: 8 parameters, one sync each for Lightning's recipe
    assert {n: r[3] for n, r in rows.items()} == {
        "none": "+0.00", "gradient_norm": "+0.00", "lightning_grad_norm_recipe": "+8.00", "nan_guard": "+1.00",
    }  # fmt: skip


def test_overhead_under_gradient_accumulation_for_the_noise_scale(tmp_path: Path) -> None:
    out = run_script(
        "overhead.py",
        *("--steps", "12", "--rounds", "1", "--warmup", "2", "--log-every-n-steps", "5", "--batch-size", "8"),
        *(
            "--accumulate-grad-batches",
            "2",
            "--configs",
            "none,noise_scale,noise_scale_every_step",
            "--logdir",
            str(tmp_path),
        ),
        tmp_path=tmp_path,
    )
    assert "accumulate=2" in out
    rows = table_rows(out)
    # at the Trainer's cadence nothing is read on other steps; measuring every step transfers on every step
    assert {n: r[3] for n, r in rows.items()} == {
        "none": "+0.00",
        "noise_scale": "+0.00",
        "noise_scale_every_step": "+1.00",
    }


def test_overhead_gpt_path_in_bf16(tmp_path: Path) -> None:
    # the GPU measurement's model, shrunk to run on a CPU: the same code path, in bf16-mixed
    out = run_script(
        "overhead.py",
        *("--model", "gpt", "--gpt-dims", "2,32,4,500,16", "--precision", "bf16-mixed", "--batch-size", "4"),
        *("--steps", "12", "--rounds", "1", "--warmup", "2", "--log-every-n-steps", "5"),
        *("--configs", "none,grad_watch_preset", "--logdir", str(tmp_path)),
        tmp_path=tmp_path,
    )
    assert "model=gpt(2,32,4,500,16)" in out and "precision=bf16-mixed" in out
    rows = table_rows(out)
    assert rows["grad_watch_preset"][3] == "+1.00"  # NaNGuard's flag, in bf16


def test_clipping_quality_runs(tmp_path: Path) -> None:
    out = run_script(
        "clipping_quality.py",
        *("--seeds", "1", "--steps", "40", "--spike-step", "20", "--optimizers", "adam"),
        *("--methods", "none,adaptive_zscore", "--json", str(tmp_path / "raw.json")),
        tmp_path=tmp_path,
    )
    assert "adaptive_zscore" in out and (tmp_path / "raw.json").exists()


def test_hook_profile_names_each_hook_of_the_preset(tmp_path: Path) -> None:
    out = run_script("hook_profile.py", "grad_watch_preset", "--steps", "12", "--skip", "2", "--batch-size", "8",
                     tmp_path=tmp_path)  # fmt: skip
    timed = {line.split()[0] for line in out.splitlines()[1:]}
    assert {"NaNGuard._before_optimizer_step", "AdaptiveClipping._before_optimizer_step"} <= timed
    assert "LossSpikeGuard.on_before_backward" in timed and "GradientNormLogger._before_optimizer_step" in timed


def test_guard_integrity_matrix_runs_and_a_gan_rollback_keeps_nothing_faulty(tmp_path: Path) -> None:
    out = run_script(
        "guard_integrity.py", "--setups", "two", "--faults", "nan_weight", "--actions", "rollback", tmp_path=tmp_path
    )
    assert "| two | nan_weight | NaNGuard rollback | 1/1 | 0 | went on" in out


def gpu_check(check: str, tmp_path: Path, *args: str) -> dict:
    import json

    run_script("gpu_checks.py", check, "--device", "cpu", "--out", str(tmp_path), *args, tmp_path=tmp_path)
    return json.loads((tmp_path / f"check_{check}.json").read_text())


def test_gpu_check_of_fused_amp_runs_on_a_cpu_with_a_real_grad_scaler(tmp_path: Path) -> None:
    # the GPU suite's check, on a CPU's fp16 GradScaler: AdamW(fused=True) reaches the hook with the gradients still
    # scaled; three injected overflows are counted, nothing is flagged, and clipping sees the unscaled norm
    result = gpu_check("fused-amp", tmp_path, "--dims", "1,32,4,200,16", "--batch-size", "4", "--steps", "30")
    for optimizer in ("fused", "foreach"):
        verdict = result[optimizer]
        assert verdict["nan_guard_overflow_steps"] == verdict["scale_backoffs"] == 3, verdict
        assert verdict["pass"] and verdict["pre_clip_norm_vs_unscaled_max_rel_err"] < 1e-4, verdict


def test_gpu_check_of_distributed_norms_runs_on_a_cpu_under_ddp(tmp_path: Path) -> None:
    # on a CPU the FSDP run is left out (Lightning's FSDPStrategy needs a GPU): one-process DDP against one device,
    # with a NaN batch and two gradient spikes: the same norms, alerts and clipped steps
    result = gpu_check("fsdp", tmp_path, "--dims", "2,32,4,200,16", "--batch-size", "4", "--steps", "30")
    assert "fsdp" not in result and result["pass"], result
    assert result["ddp"]["clipped_steps"] == result["single"]["clipped_steps"] == [8, 22]
    assert result["ddp"]["warnings"] == ["non_finite@15:loss"]


def test_launch_count_attributes_the_preset_operations(tmp_path: Path) -> None:
    import torch

    out = run_script("launch_count.py", "--configs", "grad_watch_preset,nan_guard", "--sites", "3", tmp_path=tmp_path)
    rows = table_rows(out)
    totals = {name: float(rows[name][0]) for name in ("grad_watch_preset", "nan_guard")}
    assert any(name.endswith("screen_step") for name in rows)  # a call site, under NaNGuard's row
    assert 0 < totals["nan_guard"] < totals["grad_watch_preset"]
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10):  # the profiler's Python events
        # 361 before SetupCheck stopped copying every weight on every step (148 parameter tensors here)
        assert totals["grad_watch_preset"] < 260
