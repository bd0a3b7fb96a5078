"""NaNGuard's own per-step cost, timed directly: its hook's time as a fraction of the step it runs in.

On a shared CPU the side-by-side ratio of benchmarks/overhead.py is noisy at the 1-2% level; this times the
guard's step work (``_before_optimizer_step`` and ``on_before_backward``) and the whole step in the same run,
and reports medians over steps.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/nanguard_hook_time.py [PRECISION ...]   # default 32-true

(bf16-mixed works too, but bf16 matmuls are very slow on CPUs without AMX.)
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from overhead import Bench, StepTimer  # noqa: E402

import lightning_gradwatch as gw  # noqa: E402


def timed(times: list[float], fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return out

    return wrapper


def measure(action: str, precision: str, steps: int = 80, warmup: int = 10) -> tuple[float, float]:
    guard, timer = gw.NaNGuard(action=action), StepTimer()
    step_work: list[float] = []
    backward_work: list[float] = []
    guard._before_optimizer_step = timed(step_work, guard._before_optimizer_step)  # type: ignore[method-assign]
    guard.on_before_backward = timed(backward_work, guard.on_before_backward)  # type: ignore[method-assign]
    model = Bench("mlp")
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=steps,
        callbacks=[guard, timer],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, model.data(steps, 256))
    hook = statistics.mean(a + b for a, b in zip(step_work[warmup:], backward_work[warmup:], strict=True))
    return hook, statistics.median(timer.times[warmup:])


def main() -> None:
    torch.set_num_threads(1)
    print(
        f"\nmodel=mlp (2.3M parameters) batch=256 device={platform.machine()} CPU, 1 thread torch={torch.__version__}\n"
    )
    print("| action | precision | guard per step (ms, mean) | step (ms, median) | fraction |")
    print("|---|---|---|---|---|")
    for action in ("halt", "rollback"):
        for precision in sys.argv[1:] or ["32-true"]:
            hook, step = measure(action, precision)
            print(f"| {action} | {precision} | {hook * 1e3:.2f} | {step * 1e3:.1f} | {hook / step:.1%} |")


if __name__ == "__main__":
    main()
