"""What GradWatch() says about each user mistake of tests/mistakes/scenarios.py, and about its healthy twin.

For every scenario, both ways (the mistake and its twin, every variant), it prints the raw truth of a run without
any callback (loss trajectory, gradient norms, exactly-zero gradient fractions, layers without gradient,
saturation) and then, for a run under ``GradWatch()`` at its defaults (and ``GradWatch(nan_action="skip")`` where
NaN is involved), every alert (step, kind, severity, name, the first 100 characters of the message), whether the
run halted and at which step, and the count of warning-level alerts::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 10 python benchmarks/mistakes_sweep.py            # all (~2 min)
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/mistakes_sweep.py --only tiny_loss,gru_plateau

A healthy twin should raise no warning and not halt; a mistake should be named.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightning_gradwatch import GradWatch, NaNGuard  # noqa: E402
from tests.mistakes import scenarios as sc  # noqa: E402

#: scenarios also run under GradWatch(nan_action="skip")
SKIP_TOO = ("lr_too_high_sgd", "nan_loss_stuck")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_gradwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _series(values: list[float], at: tuple[int, ...]) -> str:
    return ", ".join(f"{i}: {_g(values[i])}" for i in at if 0 <= i < len(values))


def truth(s: sc.Scenario) -> list[str]:
    """The raw truth of the run, from the module's trace (no callback)."""
    t = s.module.trace
    n = len(t.loss)
    at = (0, 1, 2, 3, 5, 10, 20, n // 2, n - 1)
    lines = [f"  loss   {_series(t.loss, at)}  (min {_g(min(t.loss, key=lambda v: v if v == v else math.inf))})"]
    nan_steps = [i for i, v in enumerate(t.loss) if not math.isfinite(v)]
    if nan_steps:
        lines.append(f"  non-finite loss on {len(nan_steps)} steps, first {nan_steps[0]}")
    lines.append(f"  global grad norm  {_series(t.global_norm, at)}")
    k = max(1, n // 10)
    windows = [(t.loss[i : i + k], t.global_norm[i : i + k]) for i in range(0, n - k + 1, k)]
    lines.append(
        f"  means over {k}-step windows: loss {' '.join(_g(statistics.fmean(w[0])) for w in windows)}; "
        f"grad norm {' '.join(_g(statistics.fmean(w[1])) for w in windows)}"
    )
    finite = [v for v in t.global_norm if math.isfinite(v)]
    if finite:
        lines.append(f"  global grad norm  min {_g(min(finite))}  max {_g(max(finite))}")
    lines.append(f"  zero gradient elements  {_series(t.zero_fraction, (0, n // 2, n - 1))}")
    never = [k for k, v in t.layer_norm.items() if all(x is None for x in v)]
    if never:
        lines.append(f"  layers that never got a gradient (grad is None): {', '.join(never)}")
    zero0 = [k for k, v in t.layer_norm.items() if v[0] == 0.0]
    if zero0:
        always = [k for k, v in t.layer_norm.items() if all(x == 0.0 for x in v)]
        lines.append(
            f"  layers with exactly 0.0 gradient at step 0: {', '.join(zero0)}; on every step: {always or '-'}"
        )
    for name, v in t.saturation.items():
        lines.append(f"  saturated fraction of {name}: {_series(v, (0, len(v) // 2, len(v) - 1))}")
    if len(finite) > 20:
        jumps = [
            (i, t.global_norm[i] / statistics.median(t.global_norm[i - 10 : i]))
            for i in range(10, n)
            if math.isfinite(t.global_norm[i])
        ]
        big = [(i, r) for i, r in jumps if r >= 5]
        lines.append(
            f"  norm jumps >= 5x the median of the 10 steps before: {len(big)}"
            + (f" ({', '.join(f'step {i}: {r:.1f}x' for i, r in big[:8])})" if big else "")
        )
    return lines


def first_batch(s: sc.Scenario) -> tuple[torch.Tensor, ...]:
    return tuple(next(iter(s.train_dataloader)))


def watched(name: str, broken: bool, variant: str, watch_kwargs: dict[str, Any]) -> list[str]:
    s = sc.build(name, broken, variant)
    watch = GradWatch(**watch_kwargs)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                trainer = sc.fit(s, [watch], tmp)
        except Exception as error:  # noqa: BLE001 (a crash under the watcher is a finding too)
            return [f"  GradWatch({_kw(watch_kwargs)}): CRASHED: {type(error).__name__}: {str(error)[:200]}"]
    seconds = time.perf_counter() - start
    halted = trainer.global_step < s.max_steps
    guard = next((cb for cb in watch.gradwatch_callbacks if isinstance(cb, NaNGuard)), None)
    halt_step = getattr(getattr(guard, "totals", None), "halt_step", None)
    warnings_count = sum(a.severity == "warning" for a in watch.alerts)
    stopped = f"HALTED at step {halt_step if halt_step is not None else '?'} (global_step {trainer.global_step})"
    lines = [
        f"  GradWatch({_kw(watch_kwargs)}): "
        + (stopped if halted else f"ran all {s.max_steps} steps")
        + f", {len(watch.alerts)} alerts, {warnings_count} warning-level ({seconds:.1f}s)"
    ]
    for a in watch.alerts:
        message = " ".join(a.message.split())[:100]
        lines.append(f"    step {a.step:>3} {a.kind:<18} {a.severity:<7} {a.name or '(model)'}: {message}")
    return lines


def _git(*args: str) -> str:
    import subprocess

    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "?"


def _kw(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args()
    _quiet()
    torch.set_num_threads(1)
    names = [n for n in args.only.split(",") if n] or list(sc.SCENARIOS)
    print(f"# Mistakes sweep: GradWatch() on tests/mistakes/scenarios.py (torch {torch.__version__})\n")
    print(
        f"code: {_git('rev-parse', '--short', 'HEAD')}, uncommitted in lightning_gradwatch/: "
        + (", ".join(_git("status", "--short", "lightning_gradwatch").splitlines()) or "none")
        + "\n"
    )
    summary: list[str] = []
    for name in names:
        for broken in (True, False):
            for variant in sc.variants(name, broken):
                label = f"{name} [{'broken' if broken else 'healthy'}{': ' + variant if variant else ''}]"
                s = sc.build(name, broken, variant)
                print(f"## {label}\n  {s.what}" if s.what else f"## {label}")
                if name == "fp16_without_scaling" and broken:
                    flushed = sc.fp16_underflow(s.module.net, s.module.loss_fn, first_batch(s))
                    print(
                        "  fp16 flushes to zero, of the gradient elements non-zero in fp32 (step 0): "
                        + ", ".join(f"{k or 'all'} {v:.0%}" for k, v in flushed.items())
                    )
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        sc.fit(s, [], tmp)
                print(f"  truth (no callback, {time.perf_counter() - start:.1f}s):")
                print("\n".join(truth(s)))
                runs = [{}] + ([{"nan_action": "skip"}] if name in SKIP_TOO else [])
                for kwargs in runs:
                    lines = watched(name, broken, variant, kwargs)
                    print("\n".join(lines))
                    summary.append(f"| {label} | {_kw(kwargs) or 'defaults'} | {lines[0].split(': ', 1)[1]} |")
                print()
    print("## Summary\n\n| scenario | GradWatch | result |\n|---|---|---|")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
