"""Calibration data for gradwatch's detectors: real architectures, trained with their usual recipes on CPU.

Every model of ``tests/real_models`` (torchvision, timm, transformers and classic nets) is fitted twice from the
same seed: with ``GradWatch()`` at its defaults and with ``GradWatch(clipping=None)`` (what AdaptiveClipping
changes). The first run also carries raw probes (``benchmarks/real_model_probe.py``) that read the tensors
directly, not gradwatch's callbacks: the global gradient norm of every step before and after clipping, every
layer's gradient RMS at four steps, and which units of every ReLU/ReLU6/Hardswish had a live pre-activation on
every 10th batch. A few deliberately broken "fault controls" show what real faults look like in the same
measurements. Prints markdown tables (see ``benchmarks/RESULTS_calibration.md``)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 10 python benchmarks/calibrate_real_models.py [--cases a,b] [--json f]

Needs the ``real`` extra (``pip install -e ".[real]"``); cases whose library is missing are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import statistics
import warnings
from typing import Any

from tests.real_models.shim import ensure_torchvision_loads

ensure_torchvision_loads()  # before lightning: torchmetrics imports torchvision

import torch  # noqa: E402

from benchmarks.real_model_probe import DeadUnitProbe, GradProbe  # noqa: E402
from lightning_gradwatch import GradWatch  # noqa: E402
from tests.real_models import models  # noqa: E402
from tests.real_models.tasks import RealTask  # noqa: E402

_ACTIVATION_METRICS = ("dead_fraction", "saturation")
HISTORY = 20  # steps of history a jump is measured against (the same as GradientNormLogger's history_size)


def _with_recipe(build: Any, **changes: Any) -> Any:
    def faulty() -> RealTask:
        task = build()
        task.recipe = dataclasses.replace(task.recipe, **changes)
        return task

    return faulty


# Healthy variants outside the test group, stress and fault runs for contrast: what dying units and a real
# explosion look like in the same measurements.
CONTROLS = [
    models.Case("EXTRA vae, 2 hidden layers (400, 200)", lambda: models.vae(hidden=(400, 200)), max_steps=300),
    models.Case("STRESS vae (400, 200) lr 0.03", lambda: models.vae(hidden=(400, 200), lr=0.03), max_steps=300),
    models.Case("FAULT resnet18 lr 1.0", _with_recipe(models.resnet18, lr=1.0), ("torchvision",)),
    models.Case("CONTROL lstm lm without gradient_clip_val", models.lstm_language_model),
]


def jump_stats(norms: list[float], every: int = 1) -> dict[str, Any]:
    """Largest ratio of a norm to the median of the ``HISTORY`` before it (over every ``every``-th step, as the
    logged-history rule sees them), where it happened, and whether it was a transient: the next 3 values back
    under 2x that median."""
    series = norms[every - 1 :: every]
    best: dict[str, Any] = {"ratio": 0.0, "step": None, "transient": None, "over5": 0, "over10": 0}
    start = 5 if every > 1 else HISTORY  # the logged rule starts after 5 logged values
    for t in range(start, len(series)):
        history = [v for v in series[max(0, t - HISTORY) : t] if v != float("inf")]
        if not history or series[t] == float("inf"):
            continue
        median = statistics.median(history)
        ratio = series[t] / median
        best["over5"] += ratio > 5
        best["over10"] += ratio > 10
        if ratio > best["ratio"]:
            after = [v / median for v in series[t + 1 : t + 4]]
            best.update(ratio=ratio, step=t * every + every - 1, transient=bool(after) and max(after) < 2)
    return best


def _with_loss(alert: dict[str, Any], losses: list[float]) -> dict[str, Any]:
    """The mean training loss over the 20 steps before the alert's step and the 20 after (did the run go on
    training?). The GAN's losses are per batch, two optimizer steps each."""
    step = alert["step"] // (2 if len(losses) * 2 <= alert["step"] + 1 else 1)
    before, after = losses[max(0, step - 20) : step], losses[step : step + 20]
    alert["loss_around"] = [statistics.mean(before) if before else None, statistics.mean(after) if after else None]
    return alert


def layer_summary(rows: list[tuple[str, float]]) -> str:
    """first/last layer RMS ratio, and the smallest first-half layer RMS relative to the median (the vanishing
    rule's quantity, in module order)."""
    rms = [r for _, r in rows if r > 0]
    if len(rms) < 2:
        return "-"
    median = statistics.median(rms)
    first_half = [(r / median, n) for n, r in rows[: len(rows) // 2] if r > 0]
    low, name = min(first_half)
    smallest = min(r for _, r in rows[: len(rows) // 2] if r > 0)
    return (
        f"{rms[0] / rms[-1]:.2g} / {low:.2g} ({name.removeprefix('net.')}), smallest first-half RMS "
        f"{smallest:.2g}, max/median {max(rms) / median:.2g}"
    )


def sweep(case: models.Case, seed: int) -> dict[str, Any]:
    """One more seed with GradWatch() and the raw probes: its alerts, largest jumps and worst dead window."""
    pre, dead, gw = GradProbe(), DeadUnitProbe(), GradWatch(report=False)
    result = models.fit(case, "/tmp/gradwatch_calibration", [pre, dead, gw], seed=seed)
    k = max(1, len(result.losses) // 10)
    summaries = {site: dead.site_summary(site) for site in dead.alive}
    worst = max(summaries.items(), key=lambda kv: max(kv[1]["window_dead"]), default=None)
    return {
        "name": case.name,
        "seed": seed,
        "loss": [sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k],
        "alerts": [_with_loss(dataclasses.asdict(a), result.losses) for a in gw.alerts],
        "every_step": [jump_stats(pre.norm_series(i)) for i in sorted(pre.norms)],
        "logged": [jump_stats(pre.norm_series(i), every=10) for i in sorted(pre.norms)],
        "worst_dead": (worst[0], worst[1]) if worst else None,
    }


def run(case: models.Case) -> dict[str, Any]:
    n = case.max_steps // (2 if case.name == "gan" else 1)
    pre, post = GradProbe(layer_steps=(0, n // 10, n // 2, n - 1)), GradProbe()
    dead, gw = DeadUnitProbe(), GradWatch(report=False)
    result = models.fit(case, "/tmp/gradwatch_calibration", [pre, dead, gw, post])
    plain_gw, plain_pre = GradWatch(report=False, clipping=None), GradProbe()
    plain = models.fit(case, "/tmp/gradwatch_calibration", [plain_pre, plain_gw])
    out: dict[str, Any] = {"name": case.name, "steps": case.max_steps, "cpu_s": result.cpu_seconds}
    k = max(1, len(result.losses) // 10)
    out["loss"] = [sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k, sum(plain.losses[-k:]) / k]
    out["held_out"] = [result.quality_before, result.quality_after, plain.quality_after]
    out["alerts"] = [_with_loss(dataclasses.asdict(a), result.losses) for a in gw.alerts]
    out["alerts_no_clip"] = [_with_loss(dataclasses.asdict(a), plain.losses) for a in plain_gw.alerts]
    out["optimizers"] = {}
    for index in sorted(pre.norms):
        raw, clipped = pre.norm_series(index), post.norm_series(index)
        coefficients = [c / r for r, c in zip(raw, clipped, strict=True) if 0 < r < float("inf")]
        plain_raw = plain_pre.norm_series(index)
        out["optimizers"][index] = {
            "norms": raw,
            "every_step": jump_stats(raw),
            "logged": jump_stats(raw, every=10),
            "norms_no_clip": plain_raw,
            "every_step_no_clip": jump_stats(plain_raw),
            "logged_no_clip": jump_stats(plain_raw, every=10),
            "clipped_steps": sum(c < 0.999 for c in coefficients),
            "min_coefficient": min(coefficients, default=1.0),
            "layers": {step: layer_summary(rows) for (i, step), rows in pre.layer_rms.items() if i == index},
        }
    logged = result.logger.history
    out["clip_metrics"] = {
        "spikes": sum(v for key, s in logged.items() if key.startswith("gradwatch/clip/spikes") for _, v in s),
        "clipped_fraction": statistics.mean(
            [v for key, s in logged.items() if key.startswith("gradwatch/clip/clipped_fraction") for _, v in s] or [0]
        ),
    }
    out["dead"] = {site: dead.site_summary(site) for site in dead.alive}
    out["watched"] = sorted({part for key in logged for part in key.split("/")[1:2] if part in _ACTIVATION_METRICS})
    return out


def _alerts(alerts: list[dict[str, Any]]) -> str:
    def loss(a: dict[str, Any]) -> str:
        before, after = a["loss_around"]
        return f", loss {before:.3g} -> {after:.3g}" if before is not None and after is not None else ""

    return (
        "; ".join(
            f"{a['kind']} {a['name'] or '-'} @{a['step']} ({a['value']:.3g} > {a['threshold']:.3g}{loss(a)})"
            for a in alerts
        )
        or "none"
    )


def _dead_line(summary: dict[str, Any]) -> str:
    windows = " ".join(f"{v:.0%}" for v in summary["window_dead"])
    return (
        f"{summary['units']} units, dead per window {windows}; never alive {summary['never_alive']:.0%}, "
        f"died {summary['died']:.0%}, revived {summary['revived']:.0%}"
    )


def report(results: list[dict[str, Any]]) -> None:
    print(
        "| model | steps | CPU s | loss first -> last (no clip) | held-out (no clip) | max jump, step, transient "
        "(no clip) | logged-rule max (no clip) | clipped steps (min coef) / spikes | worst dead window | alerts "
        "GradWatch() | alerts clipping=None |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for index, o in r["optimizers"].items():
            name = r["name"] + (f" opt{index}" if len(r["optimizers"]) > 1 else "")
            e, lg, e0, lg0 = o["every_step"], o["logged"], o["every_step_no_clip"], o["logged_no_clip"]
            jump = (
                f"{e['ratio']:.1f}x @{e['step']} {'yes' if e['transient'] else 'no'} "
                f"({e0['ratio']:.1f}x @{e0['step']} {'yes' if e0['transient'] else 'no'})"
            )
            dead = max(r["dead"].items(), key=lambda kv: max(kv[1]["window_dead"]), default=None)
            worst = f"{max(dead[1]['window_dead']):.0%} {dead[0].removeprefix('net.')}" if dead else "-"
            loss = f"{r['loss'][0]:.3g} -> {r['loss'][1]:.3g} ({r['loss'][2]:.3g})"
            held = f"{r['held_out'][1]:.3g} ({r['held_out'][2]:.3g})"
            clipped = f"{o['clipped_steps']} ({o['min_coefficient']:.2g}) / {r['clip_metrics']['spikes']:.0f}"
            logged = f"{lg['ratio']:.1f}x @{lg['step']} ({lg0['ratio']:.1f}x @{lg0['step']})"
            print(
                f"| {name} | {r['steps']} | {r['cpu_s']:.0f} | {loss} | {held} | {jump} | {logged} | {clipped} "
                f"| {worst} | {_alerts(r['alerts'])} | {_alerts(r['alerts_no_clip'])} |"
            )
    print()
    for r in results:
        print(f"### {r['name']}\n")
        print(f"- alerts with GradWatch(): {_alerts(r['alerts'])}")
        print(f"- alerts with GradWatch(clipping=None): {_alerts(r['alerts_no_clip'])}")
        print(
            f"- activation metrics logged: {', '.join(r['watched']) or 'none'}; AdaptiveClipping's clipped "
            f"fraction (logged mean) {r['clip_metrics']['clipped_fraction']:.3f}"
        )
        for index, o in r["optimizers"].items():
            e = o["every_step"]
            e0 = o["every_step_no_clip"]
            print(
                f"- optimizer {index}: steps over 5x / 10x their 20-step median: {e['over5']} / {e['over10']} "
                f"(no clip: {e0['over5']} / {e0['over10']}); logged-rule over 10x: {o['logged']['over10']} "
                f"(no clip: {o['logged_no_clip']['over10']})"
            )
            for step, text in sorted(o["layers"].items()):
                print(f"  - layer grad RMS, step {step}: first/last, min first-half/median (layer): {text}")
        ranked = sorted(r["dead"].items(), key=lambda kv: -max(kv[1]["window_dead"]))
        for site, summary in [kv for kv in ranked if max(kv[1]["window_dead"]) >= 0.2][:5]:
            print(f"- dead units `{site}`: {_dead_line(summary)}")
        print()


def report_sweep(rows: list[dict[str, Any]]) -> None:
    print(
        "| model | seed | loss first -> last | max jump, step, transient | logged-rule max | worst dead site: "
        "windows, never alive, died | alerts (GradWatch()) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        jumps = ", ".join(
            f"{e['ratio']:.1f}x @{e['step']} {'yes' if e['transient'] else 'no'}" for e in r["every_step"]
        )
        logged = ", ".join(f"{e['ratio']:.1f}x @{e['step']}" for e in r["logged"])
        dead = "-"
        if r["worst_dead"]:
            site, d = r["worst_dead"]
            windows = " ".join(f"{v:.0%}" for v in d["window_dead"])
            dead = f"{site.removeprefix('net.')}: {windows}; {d['never_alive']:.0%}, {d['died']:.0%}"
        print(
            f"| {r['name']} | {r['seed']} | {r['loss'][0]:.3g} -> {r['loss'][1]:.3g} | {jumps} | {logged} | {dead} "
            f"| {_alerts(r['alerts'])} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all, and controls)")
    parser.add_argument("--no-controls", action="store_true", help="skip the deliberate-fault controls")
    parser.add_argument("--json", default=None, help="also write every raw series to this JSON file")
    parser.add_argument("--seeds", default="", help="extra seeds for a sweep of the test-group models (e.g. 1,2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_gradwatch").setLevel(logging.ERROR)
    cases = models.CASES + ([] if args.no_controls else CONTROLS)
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    available = [c for c in cases if all(importlib.util.find_spec(lib) for lib in c.requires)]
    results = []
    for case in available:
        results.append(run(case))
        print(f"<!-- {case.name} done in {results[-1]['cpu_s']:.0f} s CPU -->", flush=True)
    report(results)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    swept = [sweep(case, seed) for case in available if case in models.CASES for seed in seeds]
    if swept:
        print(f"## Seed sweep (seeds {args.seeds}; seed 0 is above)\n")
        report_sweep(swept)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "sweep": swept}, f)


if __name__ == "__main__":
    main()
