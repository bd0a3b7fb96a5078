"""HealthReport: an end-of-run diagnosis built from every gradwatch callback's alerts."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import lightning.pytorch as pl
from typing_extensions import override

from lightning_gradwatch._base import GradwatchCallback, gradwatch_callbacks
from lightning_gradwatch._reporting import log_dir
from lightning_gradwatch._validation import check_bool
from lightning_gradwatch.alerts import ALERT_KIND_INFO, Alert, AlertKind


@dataclass(frozen=True)
class Finding:
    """One problem of a run: every alert of one kind about one layer, folded together."""

    kind: str
    name: str
    first_step: int
    last_step: int
    occurrences: int
    worst_value: float
    threshold: float
    remedy: str
    message: str  # the first alert's message


def _severity(alert: Alert) -> float:
    """How far past its threshold an alert is, in orders of magnitude (either direction)."""
    if alert.value > 0 and alert.threshold > 0 and math.isfinite(alert.value) and math.isfinite(alert.threshold):
        return abs(math.log10(alert.value / alert.threshold))
    return math.inf


def summarize(alerts: Iterable[Alert]) -> list[Finding]:
    """Fold alerts into findings, one per (kind, name), ordered by when they started."""
    grouped: dict[tuple[str, str], list[Alert]] = {}
    for alert in alerts:
        grouped.setdefault((alert.kind, alert.name), []).append(alert)
    findings = []
    for (kind, name), group in grouped.items():
        group.sort(key=lambda a: a.step)
        worst = max(group, key=_severity)
        findings.append(
            Finding(
                kind=kind,
                name=name,
                first_step=group[0].step,
                last_step=group[-1].step,
                occurrences=len(group),
                worst_value=worst.value,
                threshold=worst.threshold,
                remedy=ALERT_KIND_INFO[kind].remedy if kind in ALERT_KIND_INFO else "see the alert message",
                message=group[0].message,
            )
        )
    return sorted(findings, key=lambda f: (f.first_step, f.kind, f.name))


def render_markdown(findings: list[Finding], steps: int, stopped_early: bool = False) -> str:
    """A short human-readable diagnosis; a healthy run gets one line."""
    ending = " (stopped early by a gradwatch guard)" if stopped_early else ""
    if not findings:
        return f"gradwatch: healthy run - no gradient problems found in {steps} steps{ending}.\n"
    lines = [
        f"# gradwatch health report: {len(findings)} problem(s) in {steps} steps{ending}",
        "",
        "| problem | where | from step | seen | worst (threshold) | usual remedy |",
        "|---|---|---|---|---|---|",
    ]
    for f in findings:
        title = ALERT_KIND_INFO[f.kind].title if f.kind in ALERT_KIND_INFO else f.kind
        lines.append(
            f"| {title} | `{f.name or '(model)'}` | {f.first_step} | {f.occurrences}x | "
            f"{f.worst_value:.3g} ({f.threshold:.3g}) | {f.remedy} |"
        )
    lines += ["", "Details (first alert of each):", ""]
    lines += [f"- step {f.first_step}, {f.kind}: {f.message}" for f in findings]
    return "\n".join(lines) + "\n"


class HealthReport(GradwatchCallback):
    r"""At the end of fit (also after a halt or an exception), print a diagnosis of the run built from the alerts
    of every gradwatch callback attached to the Trainer, and save it next to the logs as Markdown and JSON.

    Each problem found is listed once: what it is, where (layer), when it started, how often it was seen, how bad
    it got against its threshold, and the usual remedy. A healthy run says so in one line. Printed once, on rank
    zero; the files are ``gradwatch_report.md`` and ``gradwatch_report.json`` in the first logger's log directory
    (or the Trainer's ``default_root_dir``), unless ``dirpath`` is given.

    Args:
        dirpath: where to save the report files; ``None`` puts them next to the logs.
        print_report: print the Markdown report at the end of fit.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradientNormLogger, HealthReport

        trainer = Trainer(callbacks=[GradientNormLogger(), HealthReport()])
    """

    hook_order = 100
    single_instance = True

    def __init__(self, dirpath: str | None = None, print_report: bool = True) -> None:
        super().__init__()
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"`dirpath` must be a path or None, got {dirpath!r}.")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.print_report = check_bool("print_report", print_report)
        self.findings: list[Finding] = []
        self.report_paths: list[str] = []

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._report(trainer)

    def _report(self, trainer: pl.Trainer) -> None:
        alerts = [a for cb in gradwatch_callbacks(trainer) for a in cb.alerts]
        self.findings = summarize(alerts)
        if not trainer.is_global_zero:
            return
        stopped_early = bool(trainer.should_stop) and any(
            f.kind in (AlertKind.NON_FINITE, AlertKind.LOSS_SCALE_COLLAPSE) for f in self.findings
        )
        text = render_markdown(self.findings, trainer.global_step, stopped_early)
        directory = self.dirpath or log_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        md_path = os.path.join(directory, "gradwatch_report.md")
        json_path = os.path.join(directory, "gradwatch_report.json")
        with open(md_path, "w") as f:
            f.write(text)
        with open(json_path, "w") as f:
            json.dump(
                {
                    "healthy": not self.findings,
                    "steps": trainer.global_step,
                    "stopped_early": stopped_early,
                    "findings": [asdict(f) for f in self.findings],
                },
                f,
                indent=2,
            )
        self.report_paths = [md_path, json_path]
        if self.print_report:
            print(text + (f"(saved to {md_path})\n" if self.findings else ""), end="")
