"""Run a real 2-process DDP training script (gloo, CPU) and collect what each rank reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).parent.parent


def run_ddp_script(name: str, out_dir: Path, *args: str, timeout: float = 180) -> list[dict[str, Any]]:
    """Run ``tests/scripts/<name>`` (which launches ``Trainer(strategy="ddp", devices=2)``) and return the
    JSON each rank wrote with :func:`report`, ordered by rank. Fails with the script's output on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), str(out_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(out_dir),
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    results = []
    for rank in range(2):
        path = out_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report\nstderr:\n{proc.stderr[-8000:]}"
        results.append(json.loads(path.read_text()))
    return results


def report(out_dir: str | Path, rank: int, data: dict[str, Any]) -> None:
    """Called by a DDP script on each rank to hand its results back to the test."""
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(data))


def ddp_strategy() -> Any:
    """A CPU DDP strategy that fails fast on a desync instead of hanging."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
