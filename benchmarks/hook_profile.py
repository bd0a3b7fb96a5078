"""Where a configuration's per-step time goes: the wall time of each gradwatch hook in one fit, median over steps.

Wraps every gradwatch callback's hooks (and the step's shared gradient pass) with ``time.perf_counter`` in a fit of
``benchmarks/overhead.py``'s model, then prints one line per hook: how often it ran, its median and its mean (the
mean minus the median is what logging steps add). The first steps are left out (warm-up).

    OMP_NUM_THREADS=1 python benchmarks/hook_profile.py grad_watch_preset
    OMP_NUM_THREADS=1 python benchmarks/hook_profile.py adaptive_clipping --steps 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import overhead  # noqa: E402

from lightning_gradwatch import _step  # noqa: E402
from lightning_gradwatch.core import GradwatchCallback  # noqa: E402

HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def wrap(owner: Any, attr: str, label: str, times: dict[str, list[float]]) -> None:
    inner = getattr(owner, attr)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            times[label].append(time.perf_counter() - start)

    setattr(owner, attr, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a configuration of benchmarks/overhead.py, e.g. grad_watch_preset")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=20, help="first calls of each hook left out")
    parser.add_argument("--batch-size", type=int, default=256)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    args = argparse.Namespace(
        device="cpu",
        model="mlp",
        gpt_dims=overhead.GPT_DIMS,
        precision="32-true",
        batch_size=cli.batch_size,
        steps=cli.steps,
        warmup=10,
        log_every_n_steps=50,
        logdir=tempfile.mkdtemp(prefix="gradwatch-hook-profile-"),
        clock="wall",
        accumulate_grad_batches=1,
    )
    trainer, model, data = overhead.make_fit(cli.config, args, [], cli.config)
    times: dict[str, list[float]] = defaultdict(list)
    callbacks = [c for top in trainer.callbacks for c in [top, *getattr(top, "gradwatch_callbacks", [])]]
    for callback in callbacks:
        if not isinstance(callback, GradwatchCallback):
            continue
        for hook in HOOKS:
            wrap(callback, hook, f"{type(callback).__name__}.{hook}", times)
    wrap(_step.StepGradients, "param_norms", "StepGradients.param_norms (first call: the pass)", times)
    trainer.fit(model, data)
    print(f"{cli.config}: {cli.steps} steps, batch {cli.batch_size}, torch {torch.__version__}")
    for label, values in sorted(times.items()):
        kept = values[cli.skip :] if len(values) > 2 * cli.skip else values
        median, mean = statistics.median(kept) * 1e3, statistics.fmean(kept) * 1e3
        print(f"{label:70s} n={len(kept):5d} median {median:.3f} ms  mean {mean:.3f} ms")


if __name__ == "__main__":
    main()
