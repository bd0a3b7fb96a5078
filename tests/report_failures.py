"""What the ``GradWatch()`` preset says about real training failures, against the raw truth (issue 11).

Each scenario of ``tests/failure_models.py`` is trained with ``GradWatch()`` at its defaults and the Trainer's
defaults (``log_every_n_steps=50``, a ModelCheckpoint), on CPU. For each it prints the alerts (kind, layer, the
step in the alert and the step at which it was emitted), the health report's lines, the truth measured from the
tensors on every step, and the latency from the onset of the failure to the first relevant alert::

    OMP_NUM_THREADS=1 python -m tests.report_failures                 # every scenario (~1 min on CPU)
    OMP_NUM_THREADS=1 python -m tests.report_failures --only rnn,tanh --ddp

``--ddp`` adds the 2-process DDP run of the dead layer (tests/scripts/ddp_dead_layer.py, ~25 s).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_gradwatch import AdaptiveClipping, GradWatch, HealthReport, NaNGuard
from tests import failure_models as fm


class AlertClock(pl.Callback):
    """The training step (0-based, as the trace counts) at whose end each alert existed: its emission. An alert's
    own ``step`` differs: a spike's is the spike's step; an activation alert's is ``global_step`` after the step."""

    def __init__(self, watch: GradWatch) -> None:
        self.watch, self.emitted_at = watch, {}

    def _tick(self, trainer: pl.Trainer) -> None:
        for a in self.watch.alerts:
            self.emitted_at.setdefault(id(a), trainer.global_step - 1)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._tick(trainer)

    def on_fit_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._tick(trainer)


@dataclass
class Run:
    module: fm.FailureModule
    watch: GradWatch
    trainer: pl.Trainer
    updates: fm.UpdateRecorder
    clock: AlertClock
    seconds: float
    report: list[str] = field(default_factory=list)

    def callback(self, kind: type) -> Any:
        return next(cb for cb in self.watch.gradwatch_callbacks if isinstance(cb, kind))

    def alerts(self) -> list[str]:
        return [
            f"{a.kind}@{a.step} (emitted {self.clock.emitted_at.get(id(a), '?')}) `{a.name or '(model)'}` "
            f"value={a.value:.3g}"
            for a in self.watch.alerts
        ] or ["none"]

    def first(self, kind: str, name: str | None = None) -> int | None:
        hits = [self.clock.emitted_at[id(a)] for a in self.watch.alerts if a.kind == kind and name in (None, a.name)]
        return min(hits) if hits else None


def run(module: fm.FailureModule, steps: int, root: str, **watch_kwargs: Any) -> Run:
    watch = GradWatch(**watch_kwargs)
    updates, clock = fm.UpdateRecorder(), AlertClock(watch)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the report is read back from its file below
        trainer = fm.fit(module, steps, [watch, updates, clock], root)
    result = Run(module, watch, trainer, updates, clock, time.perf_counter() - start)
    paths = result.callback(HealthReport).report_paths
    if paths:
        lines = Path(paths[0]).read_text().splitlines()
        result.report = [
            ln for ln in lines if ln.startswith(("#", "gradwatch:")) or ln.startswith("| ") and "---" not in ln
        ]
        result.report = [ln for ln in result.report if not ln.startswith("| problem")]
    return result


def cause_of(r: Any, kind: str) -> str | None:
    """The ``cause`` of the first alert of ``kind`` (what the report titles it by)."""
    return next((a.cause for a in r.watch.alerts if a.kind == kind), None)


def latency(onset: int | None, alert: int | None) -> str:
    if onset is None:
        return "no failure"
    return "never" if alert is None else f"{alert - onset} steps (onset {onset}, alert {alert})"


def fmt(values: list[float | None], spec: str = ".3g") -> str:
    return "[" + ", ".join("None" if v is None else format(v, spec) for v in values) + "]"


ROWS: list[tuple[str, str, str, str]] = []


def record(title: str, r: Run, truth: list[str], raw: list[str], row: tuple[str, str, str]) -> None:
    """Print a scenario's section; ``row`` is (scenario, truth, latency) for the summary table."""
    print(f"\n## {title}  ({r.trainer.global_step} steps, {r.seconds:.1f} s)\n")
    print("- alerts: " + "; ".join(r.alerts()))
    print("- report: " + " / ".join(ln.strip("| ") for ln in r.report))
    print("".join(f"- truth: {line}\n" for line in truth) + "".join(f"- raw: {line}\n" for line in raw), end="")
    short = [f"{a.kind}@{r.clock.emitted_at.get(id(a), '?')} `{a.name or '(model)'}`" for a in r.watch.alerts]
    ROWS.append((row[0], row[1], "; ".join(short) or "none", row[2]))


def collapsed_cnn(root: str, args: argparse.Namespace) -> None:
    r = run(fm.collapsed_cnn(args.seed), 200, root)
    t = r.module.trace
    zero = {k: fm.zero_from(v) for k, v in t.grad_norm.items()}
    dead = {k: fm.at_least_from(v, 0.99) for k, v in t.dead.items()}
    tail = statistics.mean(t.loss[-20:])
    at_logs = ", ".join(f"{k}={fmt([v[s] for s in (49, 99, 149, 199)])}" for k, v in t.grad_norm.items())
    record(
        "1. collapsed CNN (Adam lr=5)",
        r,
        [
            f"grad exactly 0.0 from step {zero} (None: never)",
            f"100% dead (per batch) from step {dead}; conv2 dead fraction steps 0-7 {fmt(t.dead['net.conv2'][:8], '.2f')}",
            f"mean loss of the last 20 steps {tail:.3f} (chance ln4 = {math.log(4):.3f})",
        ],
        [
            f"global norm, steps 0-7: {fmt(t.global_norm[:8])}",
            f"norm reaching the optimizer (after clipping), steps 0-7: {fmt(r.updates.norms[:8])}",
            f"per-layer grad norm at the logging steps 49/99/149/199: {at_logs}",
        ],
        (
            "1 collapsed CNN",
            f"conv1+conv2 grads 0.0 from step {zero['net.conv2']}, fc1 from {zero['net.fc1']}; conv2 100% dead from "
            f"{dead['net.conv2']}; last-20 loss {tail:.2f} > ln4",
            latency(zero["net.conv2"], r.first("dead_neurons")),
        ),
    )


def dead_layer(root: str, args: argparse.Namespace) -> None:
    r = run(fm.dead_layer_mlp(args.seed), 60, root + "/a")
    t = r.module.trace
    long = run(fm.dead_layer_mlp(args.seed), 120, root + "/b")
    raw = [f"120-step run: {'; '.join(long.alerts())}"]
    if args.ddp:
        from tests.distributed import run_ddp_script

        ranks = run_ddp_script("ddp_dead_layer.py", Path(root), "60")
        raw.append(
            f"DDP 2 ranks, 60 steps (alerts, fc2 dead from, fc2 grad norms): "
            f"{[(x['alerts'], x['dead_fc2_from'], x['fc2_grad_norms']) for x in ranks]}"
        )
    zero = {k: fm.zero_from(v) for k, v in t.grad_norm.items()}
    record(
        "2a. layer dead from the first step (fc2 bias -10)",
        r,
        [f"fc2 100% dead from step {fm.at_least_from(t.dead['net.fc2'], 0.99)}; grad exactly 0.0 from: {zero}"],
        raw,
        (
            "2a dead from step 0, 60 steps" + (" (also DDP x2)" if args.ddp else ""),
            "fc2 100% dead, fc1+fc2 grads 0.0 from step 0",
            f"{latency(0, r.first('dead_neurons'))} in 60 steps; {latency(0, long.first('dead_neurons'))} in 120",
        ),
    )


def unit_kill(root: str, args: argparse.Namespace) -> None:
    lr_jump = dict(kill_steps=10**9, kill_lr=1.0, scale=1.0, shift=0.0)
    variants: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("outlier batch x10+10 at lr 2.0 at step 80, GradWatch()", {}, {}),
        ("the same, GradWatch(clipping=None)", {}, {"clipping": None}),
        ("lr 0.05 -> 1.0 for good at step 80, GradWatch()", lr_jump, {}),
    ]
    for i, (label, kwargs, watch_kwargs) in enumerate(variants):
        r = run(fm.unit_kill_mlp(args.seed, **kwargs), 250, f"{root}/{i}", **watch_kwargs)
        dead = r.module.trace.dead["net.fc2"]
        onset = fm.at_least_from(dead, 0.3)
        record(
            f"2b. unit kill: {label}",
            r,
            [f"fc2 dead fraction >= 0.3 for good from step {onset}, >= 0.9 from {fm.at_least_from(dead, 0.9)}"],
            [
                f"fc2 dead fraction, steps 78-92: {fmt(dead[78:93], '.2f')}; last 3: {fmt(dead[-3:], '.2f')}",
                f"global norm, steps 78-84: {fmt(r.module.trace.global_norm[78:85])}; after clipping: "
                f"{fmt(r.updates.norms[78:85])}",
            ],
            (
                f"2b unit kill: {label}",
                f"fc2 >= 30% dead from {onset}, max {max(dead[80:]):.0%}",
                latency(onset, r.first("dead_neurons")),
            ),
        )


def overflow(root: str, args: argparse.Namespace) -> None:
    for gain in (3.0, 10.0):
        r = run(fm.overflow_mlp(args.seed, gain=gain), 60, f"{root}/{gain}")
        t = r.module.trace
        linear = [n for n in t.act_norm[0] if isinstance(r.module.get_submodule(n), torch.nn.Linear)]
        norms0 = [t.act_norm[0][n] for n in linear]
        finite = [v for v in norms0[:-1] if math.isfinite(v)]  # hidden layers (not the 4-unit head)
        growth = (finite[-1] / finite[0]) ** (1 / (len(finite) - 1))
        step = min(t.first_non_finite, default=None)
        where = t.first_non_finite.get(step) if step is not None else None
        every5 = ", ".join(f"{n}={v:.2g}" for n, v in list(zip(linear, norms0, strict=True))[::5])
        record(
            f"3. 40-layer ReLU MLP, init {gain:g}x He",
            r,
            [
                f"first non-finite module output: step {step}, `{where}`; loss per step {fmt(t.loss)}",
                f"activation growth per hidden Linear at step 0: x{growth:.2f} (geometric mean, {len(finite)} layers)",
            ],
            [
                f"step-0 Linear output norms (fp64), every 5th layer: {every5}",
                f"raw global grad norm per step: {fmt(t.global_norm)}; reaching the optimizer: {fmt(r.updates.norms)}",
            ],
            (
                f"3 overflow, 40 layers, {gain:g}x He",
                f"x{growth:.2f}/layer; first non-finite `{where}` at step {step} (step-0 grad norm {t.global_norm[0]:.2g})",
                f"{latency(step, r.first('non_finite'))}, named `loss`, cause `{cause_of(r, 'non_finite')}`",
            ),
        )


def tanh_cnn(root: str, args: argparse.Namespace) -> None:
    for depth, scale in ((14, 0.7), (16, 0.7), (16, 1.0)):
        r = run(fm.deep_tanh_cnn(args.seed, depth=depth, init_scale=scale), 100, f"{root}/{depth}-{scale}")
        truth, raw = [], []
        for s in (0, 49, 99):
            values = [v[s] for v in r.module.trace.grad_rms.values()]
            convs = [math.log10(v) for v in values[:-1]]
            mx, my = (len(convs) - 1) / 2, statistics.mean(convs)
            slope = sum((i - mx) * (y - my) for i, y in enumerate(convs)) / sum(
                (i - mx) ** 2 for i in range(len(convs))
            )
            truth.append(
                f"step {s}: first RMS {values[0]:.2g}, first/head {values[0] / values[-1]:.2g}, first/median "
                f"{values[0] / statistics.median(values):.2g}, slope {slope:.2f} decades per conv layer"
            )
            raw.append(f"RMS by depth at step {s}: {fmt(values, '.1e')}")
        record(
            f"4. deep tanh CNN, {depth} conv layers, init x{scale:g}",
            r,
            truth,
            raw,
            (f"4 tanh CNN, {depth} conv, init x{scale:g}", truth[0], latency(0, r.first("vanishing_gradient"))),
        )


def rnn(root: str, args: argparse.Namespace) -> None:
    r = run(fm.exploding_rnn(args.seed), 100, root)
    t, sat = r.module.trace, r.module.net.saturation
    stats = r.callback(AdaptiveClipping)._stats[0]  # measurement only: its statistics at the end of the run
    clipped = float(stats.total_clipped) / max(float(stats.total_steps), 1.0)
    mean, std = float(stats.mean), math.sqrt(float(stats.var))
    record(
        "5. vanilla tanh RNN, recurrent gain 2, SGD",
        r,
        [
            f"global norm steps 0-4: {fmt(t.global_norm[:5])}; saturation (|h|>0.99) steps 0-4: "
            f"{fmt(sat[:5], '.3f')}, last: {sat[-1]:.4f}",
            f"net.rnn grad exactly 0.0 from step {fm.zero_from(t.grad_norm['net.rnn'])}",
        ],
        [
            f"norm reaching the optimizer steps 0-4 (after AdaptiveClipping): {fmt(r.updates.norms[:5])}",
            f"the norm logger saw (steps 49, 99): {fmt([t.global_norm[s] for s in (49, 99)])}; net.rnn RMS there: "
            f"{fmt([t.grad_rms['net.rnn'][s] for s in (49, 99)])}",
            f"AdaptiveClipping at the end: clipped fraction {clipped:.3f}, ema mean {mean:.4g}, ema std {std:.4g}",
        ],
        (
            "5 vanilla RNN",
            f"norm {t.global_norm[0]:.2g} at step 0 (unclipped), then {sat[1]:.1%} saturated; clip "
            f"ema mean {mean:.3g}, {clipped:.0%} clipped",
            f"explosion: {latency(0, r.first('exploding_gradient'))}",
        ),
    )


def nan_guard(root: str, args: argparse.Namespace) -> None:
    r = run(fm.batchnorm_nan(args.seed), 60, root + "/halt")
    path = r.callback(NaNGuard).halt_checkpoint
    bad = fm.non_finite_tensors(path) if path else ["(no halt checkpoint)"]
    name = Path(path).name if path else None
    record(
        "6a. NaN batch at step 15, BatchNorm MLP, halt",
        r,
        [f"halt checkpoint {name}: non-finite {bad}"],
        [],
        (
            "6a NaN batch + BatchNorm, halt",
            f"{name} holds non-finite {bad}",
            f"{latency(15, r.first('non_finite'))}; checkpoint {'not good' if bad else 'finite'}",
        ),
    )

    r = run(fm.unused_nan(args.seed), 150, root + "/rollback", nan_action="rollback")
    guard, finite = r.callback(NaNGuard), bool(torch.isfinite(r.module.net.unused.weight).all())
    record(
        "6b. NaN written into an unused Linear at step 20, NaN batch at 60, rollback",
        r,
        [
            f"rollbacks {guard.rollbacks}; net.unused.weight finite at the end: {finite}",
            f"loss per step 58-62: {fmt(r.module.trace.loss[58:63])}",
        ],
        [],
        (
            "6b NaN in an unused weight, rollback",
            f"poisoned at 20; {guard.rollbacks} rollbacks; finite at end: {finite}",
            latency(20, r.first("non_finite", "net.unused")),
        ),
    )


JOBS = {
    "cnn": collapsed_cnn,
    "dead": dead_layer,
    "kill": unit_kill,
    "overflow": overflow,
    "tanh": tanh_cnn,
    "rnn": rnn,
    "nan": nan_guard,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="cnn,dead,kill,overflow,tanh,rnn,nan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_gradwatch"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as root:
        for name in args.only.split(","):
            JOBS[name](f"{root}/{name}", args)
    print(
        "\n## Summary\n\n| scenario | truth | today's alerts (kind@emitted `name`) | latency to first relevant alert |"
    )
    print("|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(c.replace("|", "/") for c in row) + " |")


if __name__ == "__main__":
    main()
