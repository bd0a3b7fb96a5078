"""What NaNGuard says about a fault: the finding (what went non-finite, what was done, where it began or that the
loss diverged first) and its cause, built from the facts of the step. Pure: strings in, strings out."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gradwatch._loss_trace import Divergence
from lightning_gradwatch.alerts import AlertCause
from lightning_gradwatch.guards._nonfinite import Fault
from lightning_gradwatch.guards._provenance import Origin

#: What each action did to the faulty step, for the finding.
DONE = {
    "halt": "the update was dropped and training stops",
    "skip": "the update was dropped",
    "rollback": "weights and optimizer state were rolled back to the snapshot (rollback {rollbacks})",
}


@dataclass(frozen=True)
class FaultResponse:
    """What the guard did about a fault: ``action`` (``"halt"``, ``"skip"``, ``"rollback"``), the rollback count,
    the other optimizers rolled back with it, and the buffers already non-finite before the step."""

    action: str
    rollbacks: int = 0
    also_rolled_back: tuple[int, ...] = ()
    unrepaired_buffers: tuple[str, ...] = ()


def fault_finding(
    step: int,
    fault: Fault,
    response: FaultResponse,
    origin: Origin | None,
    diverged: Divergence | None,
    half_precision: str | None,
) -> tuple[str, str]:
    """The ``non_finite`` finding of a faulty ``step`` and its cause (``""`` when unknown)."""
    done = DONE[response.action].format(rollbacks=response.rollbacks)
    if response.action == "rollback" and response.also_rolled_back:
        others = ", ".join(str(i) for i in response.also_rolled_back)
        done += f", and so were those of optimizer {others}, which steps the poisoned weights"
    if fault.buffers and response.action != "rollback":
        unrepaired = response.unrepaired_buffers
        done += (
            f"; the buffers {', '.join(unrepaired[:5])} were already non-finite before this step"
            if unrepaired
            else "; the buffers were restored to their values before this step"
        )
    if diverged is not None:  # the cause is the growth, not the operation where the overflow surfaced
        born = f" It surfaced at: {origin.detail}." if origin is not None else ""
        what = f"{diverged.describe()} over {diverged.end_step} steps, then went non-finite in {fault.text}"
        finding = f"Non-finite values at step {step}: {what}; {done}.{born}"
    else:
        born = f" Where it began: {origin.detail}." if origin is not None else ""
        finding = f"Non-finite values at step {step}: {fault.text}; {done}.{born}"
    cause: str = AlertCause.POISONED_WEIGHTS if fault.weights else (origin.cause if origin is not None else "")
    if diverged is not None and not fault.weights:
        cause = AlertCause.DIVERGENCE
    if half_precision is not None:  # the weights went non-finite in the update itself: float16, nothing to scale it
        finding, cause = f"{finding} {half_precision}", AlertCause.HALF_PRECISION_UPDATE
    return finding, cause


def stuck_finding(step: int, faults_in_a_row: int, fault: Fault) -> str:
    """The finding of a skipping guard whose every recent step was faulty."""
    return (
        f"Training is stuck at step {step}: the last {faults_in_a_row} steps were all faulty ({fault.text}) and "
        "their updates dropped, so the run goes nowhere; training stops."
    )


def amp_fault_finding(step: int, what: str, stops: bool) -> str:
    """The finding of non-finite values seen at an fp16 check (the GradScaler skipped those updates)."""
    return (
        f"Non-finite values under fp16 by step {step}: {what} since the last check; the GradScaler skipped those "
        f"updates{', and training stops' if stops else ''}."
    )
