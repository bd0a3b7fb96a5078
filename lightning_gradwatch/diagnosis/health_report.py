"""HealthReport: an end-of-run diagnosis built from every gradwatch callback's alerts."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import lightning.pytorch as pl
from typing_extensions import override

from lightning_gradwatch._params import clean_name
from lightning_gradwatch._reporting import log_dir
from lightning_gradwatch._validation import check_bool
from lightning_gradwatch.alerts import ALERT_CAUSES, ALERT_KIND_INFO, Alert, AlertKind
from lightning_gradwatch.core.callback import GradwatchCallback, HookOrder
from lightning_gradwatch.core.session import session_of

#: Kinds whose value and threshold are not a measurement against a limit (a count of non-finite tensors vs 0).
_NO_MEASUREMENT = frozenset({AlertKind.NON_FINITE})


@dataclass(frozen=True)
class Finding:
    """One finding of a run: every alert of one kind about one layer, folded together."""

    kind: str
    name: str
    severity: str  # "warning": a problem; "info": worth knowing
    first_step: int  # when it began (the earliest onset)
    last_step: int
    occurrences: int
    worst_value: float
    threshold: float
    title: str
    remedy: str
    message: str  # the first alert's message
    cause: str = ""
    consequence_of: str = ""  # the title of the earlier problem this one most likely follows from (one cause, one row)


def _distance(alert: Alert) -> float:
    """How far past its threshold an alert is, in orders of magnitude (either direction)."""
    if alert.value > 0 and alert.threshold > 0 and math.isfinite(alert.value) and math.isfinite(alert.threshold):
        return abs(math.log10(alert.value / alert.threshold))
    return math.inf


#: Problems that, when they come first, explain later ones of these kinds: a learning rate far too high blows the
#: gradients up and kills units; a collapse after a blow-up stops layers; a vanished gradient stops layers moving.
CONSEQUENCES: dict[str, frozenset[str]] = {
    AlertKind.LEARNING_RATE: frozenset(
        {
            AlertKind.EXPLODING_GRADIENT,
            AlertKind.GRADIENT_SPIKE,
            AlertKind.LOSS_SPIKE,
            AlertKind.DEAD_NEURONS,
            AlertKind.SATURATION,
            AlertKind.STOPPED_LAYER,
            AlertKind.UPDATE_RATIO,
        }
    ),
    AlertKind.GRADIENTS_NOT_RESET: frozenset(
        {
            AlertKind.EXPLODING_GRADIENT,
            AlertKind.GRADIENT_SPIKE,
            AlertKind.DEAD_NEURONS,
            AlertKind.UPDATE_RATIO,
            AlertKind.LEARNING_RATE,
            AlertKind.LOSS_SPIKE,
        }
    ),
    AlertKind.EXPLODING_GRADIENT: frozenset({AlertKind.STOPPED_LAYER, AlertKind.DEAD_NEURONS, AlertKind.UPDATE_RATIO}),
    AlertKind.GRADIENT_SPIKE: frozenset({AlertKind.STOPPED_LAYER, AlertKind.DEAD_NEURONS}),
    AlertKind.VANISHING_GRADIENT: frozenset({AlertKind.STOPPED_LAYER, AlertKind.UPDATE_RATIO}),
    AlertKind.NOT_IN_OPTIMIZER: frozenset({AlertKind.UPDATE_RATIO}),
    AlertKind.GRADIENT_UNDERFLOW: frozenset(
        {AlertKind.STOPPED_LAYER, AlertKind.UPDATE_RATIO, AlertKind.VANISHING_GRADIENT, AlertKind.DEAD_NEURONS}
    ),
    AlertKind.NO_GRADIENT: frozenset({AlertKind.UPDATE_RATIO, AlertKind.STOPPED_LAYER}),
}


def summarize(alerts: Iterable[Alert], model_order: Sequence[str] = ()) -> list[Finding]:
    """Fold alerts into findings, one per (kind, name, severity), ordered by when they began (layers of one step in
    ``model_order``, the model's module names): the first problem of a run is listed first, so it reads as the
    cause of what followed. A warning that most likely follows from an earlier one (see :data:`CONSEQUENCES`) names
    it in ``consequence_of``."""
    rank = {name: i for i, name in enumerate(model_order)}
    grouped: dict[tuple[str, str, str], list[Alert]] = {}
    for alert in alerts:
        grouped.setdefault((alert.kind, alert.name, alert.severity), []).append(alert)
    findings = []
    for (kind, name, severity), group in grouped.items():
        group.sort(key=lambda a: (a.began, a.step))
        worst = max(group, key=_distance)
        cause = next((a.cause for a in group if a.cause in ALERT_CAUSES), "")
        info = ALERT_CAUSES[cause] if cause else ALERT_KIND_INFO.get(kind)
        findings.append(
            Finding(
                kind=kind,
                name=name,
                severity=severity,
                first_step=group[0].began,
                last_step=max(a.step if a.last_step is None else a.last_step for a in group),
                occurrences=sum(a.count for a in group),
                worst_value=worst.value,
                threshold=worst.threshold,
                title=info.title if info else kind,
                remedy=info.remedy if info else "see the alert message",
                message=group[0].message,
                cause=cause,
            )
        )
    findings.sort(key=lambda f: (f.first_step, f.kind, rank.get(f.name, len(rank)), f.name))
    return _attribute(findings)


def _attribute(findings: list[Finding]) -> list[Finding]:
    """Mark each warning that began at or after an earlier warning it usually follows from (the earliest such)."""
    out: list[Finding] = []
    roots: list[Finding] = []
    for f in findings:
        root = None
        if f.severity == "warning":
            root = next((r for r in roots if f.kind in CONSEQUENCES.get(r.kind, ()) and r.kind != f.kind), None)
        if root is not None:
            f = replace(f, consequence_of=root.title)
        elif f.severity == "warning":
            roots.append(f)
        out.append(f)
    return out


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (a layer name may hold a ``|``)."""
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(
    findings: list[Finding],
    steps: int,
    stopped: str = "",
    pictures: list[tuple[str, str]] | None = None,
    measurements: list[str] | None = None,
) -> str:
    """A short human-readable diagnosis; a healthy run gets one line (and its notes, if any, below it)."""
    problems = [f for f in findings if f.severity == "warning" and not f.consequence_of]
    notes = [f for f in findings if f.severity != "warning"]
    followers: dict[str, list[Finding]] = {}
    for f in findings:
        if f.severity == "warning" and f.consequence_of:
            followers.setdefault(f.consequence_of, []).append(f)
    ending = f" ({stopped})" if stopped else ""
    if problems:
        lines = [
            f"# gradwatch health report: {len(problems)} problem(s) in {steps} steps{ending}",
            "",
            "| problem | where | began at step | seen | measured (threshold) | usual remedy |",
            "|---|---|---|---|---|---|",
        ]
        for f in problems:
            measured = "-" if f.kind in _NO_MEASUREMENT else f"{f.worst_value:.3g} ({f.threshold:.3g})"
            then = "; ".join(
                f"{c.title.lower()} in `{_cell(c.name or '(model)')}` from step {c.first_step}"
                for c in followers.get(f.title, [])
            )
            title = f"{f.title} (then: {then})" if then else f.title
            lines.append(
                f"| {_cell(title)} | `{_cell(f.name or '(model)')}` | {f.first_step} | {f.occurrences}x | {measured} | "
                f"{_cell(f.remedy)} |"
            )
    else:
        lines = [f"gradwatch: healthy run - no gradient problems found in {steps} steps{ending}."]
    if notes:
        lines += ["", "Worth knowing (no action needed):", ""]
        lines += [f"- step {f.first_step}, `{f.name or '(model)'}`: {f.message}" for f in notes]
    if problems:
        lines += ["", "Details (first alert of each):", ""]
        lines += [f"- step {f.first_step}, {f.kind}: {f.message}" for f in problems]
    if measurements:
        lines += ["", "Measured:", ""]
        lines += [f"- {line}" for line in measurements]
    for title, path in pictures or []:
        lines += ["", f"![{title}]({path})"]
    return "\n".join(lines) + "\n"


class HealthReport(GradwatchCallback):
    r"""At the end of fit (also after a halt or an exception), print a diagnosis of the run built from the alerts
    of every gradwatch callback attached to the Trainer, and save it next to the logs as Markdown and JSON.

    Each problem is listed once, in the order the problems began (the first reads as the cause of the rest): what it
    is (with the cause a callback could tell, e.g. a NaN born in an exploding forward pass), where (layer), when it
    began, how often it was seen, the measurement against its threshold, and the usual remedy. Findings of severity
    ``"info"`` (a handled transient, a stable sparse layer) are listed apart, as worth knowing; a run with none of
    severity ``"warning"`` is healthy and says so in one line. Printed once, on rank zero; the files are
    ``gradwatch_report.md`` and ``gradwatch_report.json`` in the first logger's version folder (or the Trainer's
    ``default_root_dir``), unless ``dirpath`` is given, with the pictures other callbacks draw (the gradient flow).

    Args:
        dirpath: where to save the report files; ``None`` puts them next to the logs.
        print_report: print the Markdown report at the end of fit.

    Raises:
        ValueError: ``dirpath`` is not a path, or ``print_report`` not a bool.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradientNormLogger, HealthReport

        trainer = Trainer(callbacks=[GradientNormLogger(), HealthReport()])
    """

    hook_order = HookOrder.REPORT
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
        peers = session_of(trainer).members(trainer)
        module = trainer.lightning_module
        order = [clean_name(n) for n, _ in module.named_modules()] if module is not None else []
        self.findings = summarize((a for cb in peers for a in cb.alerts), order)
        if not trainer.is_global_zero:
            return
        # a halt of this fit only: a run resumed from a halt checkpoint and stopped later by something else was not
        halts = [(cb.halt_step, type(cb).__name__) for cb in peers if cb.stopped_this_fit]
        stopped = f"stopped at step {halts[0][0]} by {halts[0][1]}" if halts else ""
        directory = self.dirpath or log_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        pictures = [item for cb in peers for item in cb._report_pictures(trainer, directory)]
        measurements = [line for cb in peers for line in cb._report_lines(trainer)]
        text = render_markdown(self.findings, trainer.global_step, stopped, pictures, measurements)
        md_path = os.path.join(directory, "gradwatch_report.md")
        json_path = os.path.join(directory, "gradwatch_report.json")
        with open(md_path, "w") as f:
            f.write(text)
        with open(json_path, "w") as f:
            json.dump(
                {
                    "healthy": not any(f.severity == "warning" for f in self.findings),
                    "steps": trainer.global_step,
                    "stopped_early": bool(stopped),
                    "stopped_at": halts[0][0] if stopped else None,
                    "findings": [asdict(f) for f in self.findings],
                    "pictures": [path for _, path in pictures],
                    **({"measured": measurements} if measurements else {}),
                },
                f,
                indent=2,
            )
        self.report_paths = [md_path, json_path]
        if self.print_report:  # the pictures are in the saved file; a healthy run prints its one line
            shown = text.split("\n\n![", 1)[0].rstrip("\n") + "\n"
            print(shown + (f"(saved to {md_path})\n" if self.findings else ""), end="")
