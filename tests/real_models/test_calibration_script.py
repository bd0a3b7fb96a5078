"""The real-model benchmark scripts still run: one case that needs no extra library each, as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<args>`` from the repository root, on one thread; it must succeed."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_calibration_script_measures_a_run_from_its_raw_tensors(tmp_path: Path) -> None:
    out = tmp_path / "calibration.json"
    done = run_script(
        "benchmarks/calibrate_real_models.py", "--cases", "gru_classifier", "--no-controls", "--json", str(out)
    )
    assert "| gru_classifier | 400 |" in done.stdout
    (run,) = json.loads(out.read_text())["runs"]
    optimizer = run["optimizers"]["0"]
    assert len(optimizer["norms"]) == len(optimizer["norms_no_clip"]) == 400  # every step, both runs
    assert all(norm > 0 for norm in optimizer["norms"])
    assert optimizer["every_step"]["ratio"] > 1.0 and optimizer["logged"]["step"] is not None
    assert sorted(optimizer["layers"]) == ["0", "200", "399", "40"]  # per-layer RMS at four steps
    assert run["loss"][1] < run["loss"][0]


def test_the_compiled_sweep_runs_a_case_silent_and_without_recompiling() -> None:
    """benchmarks/compiled_real_models.py: the VAE with its network compiled, watched from the eager passes."""
    done = run_script("benchmarks/compiled_real_models.py", "--cases", "vae")
    [row] = [line for line in done.stdout.splitlines() if line.startswith("| vae |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "300" and cells[4] == "dead_fraction" and cells[5] == "none", row
    at_two, at_end = cells[3].split(" / ")
    assert at_two == at_end and int(at_two) >= 1, row
