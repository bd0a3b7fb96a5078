"""The alert contract shared by every gradwatch callback, and the one registry of alert kinds.

Each callback keeps ``self.alerts: list[Alert]``. An alert is appended when a condition starts (or, for
events such as spikes, when it happens), never once per step while a condition persists.

Every kind (:class:`AlertKind`) and every cause (:class:`AlertCause`) is described once, in
:data:`ALERT_KIND_INFO` and :data:`ALERT_CAUSES` (a title for the report and the usual remedy). Every message is
built by :func:`alert_message`: the finding, then, for a warning, the remedy of its cause (when it has one) or of
its kind; the health report uses the same entries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Literal

__all__ = [
    "ALERT_CAUSES",
    "AlertCause",
    "ALERT_KINDS",
    "ALERT_KIND_INFO",
    "SEVERITIES",
    "Alert",
    "AlertKind",
    "AlertKindInfo",
    "Severity",
    "alert_message",
]

#: How much an alert asks of the user: ``"warning"`` needs action, ``"info"`` is worth knowing.
Severity = Literal["warning", "info"]
SEVERITIES: tuple[str, ...] = ("warning", "info")


class _Name(str, Enum):
    """A name that is its string: ``AlertKind.DEAD_NEURONS == "dead_neurons"``, formatted and hashed as it."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return format(str(self.value), format_spec)


class AlertKind(_Name):
    """The alert kinds (strings: ``alert.kind == "dead_neurons"`` and ``alert.kind == AlertKind.DEAD_NEURONS``)."""

    VANISHING_GRADIENT = "vanishing_gradient"
    EXPLODING_GRADIENT = "exploding_gradient"
    DEAD_NEURONS = "dead_neurons"
    SATURATION = "saturation"
    NON_FINITE = "non_finite"
    LOSS_SCALE_COLLAPSE = "loss_scale_collapse"
    GRADIENT_SPIKE = "gradient_spike"
    SHATTERED_GRADIENT = "shattered_gradient"
    VANISHING_JACOBIAN = "vanishing_jacobian"
    EXPLODING_JACOBIAN = "exploding_jacobian"
    STOPPED_LAYER = "stopped_layer"
    UPDATE_RATIO = "update_ratio"
    GRADIENT_UNDERFLOW = "gradient_underflow"
    LOSS_SPIKE = "loss_spike"
    LEARNING_RATE = "learning_rate"
    NOT_IN_OPTIMIZER = "not_in_optimizer"
    NO_GRADIENT = "no_gradient"
    GRADIENTS_NOT_RESET = "gradients_not_reset"
    VANISHING_THROUGH_TIME = "vanishing_through_time"
    EXPLODING_THROUGH_TIME = "exploding_through_time"


@dataclass(frozen=True)
class AlertKindInfo:
    """How a kind of finding is named in the report, and what usually fixes it."""

    title: str
    remedy: str


#: The one description of each alert kind: the report's title and the remedy every message ends with.
ALERT_KIND_INFO: dict[str, AlertKindInfo] = {
    AlertKind.VANISHING_GRADIENT: AlertKindInfo(
        "Vanishing gradients",
        "ReLU-family activations instead of sigmoid/tanh, residual connections, normalisation layers "
        "(BatchNorm/LayerNorm), He/Xavier initialisation",
    ),
    AlertKind.EXPLODING_GRADIENT: AlertKindInfo(
        "Exploding gradients",
        "clip gradients (AdaptiveClipping or Trainer(gradient_clip_val=...)), lower the learning rate, check the "
        "weight initialisation and the scale of inputs and targets",
    ),
    AlertKind.DEAD_NEURONS: AlertKindInfo(
        "Dead units",
        "LeakyReLU or GELU instead of ReLU, a lower learning rate, He (Kaiming) initialisation, biases not "
        "initialised negative",
    ),
    AlertKind.SATURATION: AlertKindInfo(
        "Saturated activations",
        "ReLU-family activations, normalisation layers (BatchNorm/LayerNorm), smaller weight initialisation",
    ),
    AlertKind.NON_FINITE: AlertKindInfo(
        "Non-finite values",
        "lower the learning rate, check the data for NaN/Inf, clip gradients, use bf16 or a GradScaler for fp16",
    ),
    AlertKind.LOSS_SCALE_COLLAPSE: AlertKindInfo(
        "Loss-scale collapse",
        "bf16 instead of fp16, a lower learning rate, look for a loss or activation that overflows fp16 (e.g. "
        "missing normalisation)",
    ),
    AlertKind.GRADIENT_SPIKE: AlertKindInfo(
        "Gradient spikes",
        "keep AdaptiveClipping on; isolated spikes are usually bad batches (outliers, label noise), frequent ones "
        "a learning rate that is too high or missing warm-up",
    ),
    AlertKind.SHATTERED_GRADIENT: AlertKindInfo(
        "Shattered gradients",
        'residual connections, normalisation layers (BatchNorm/LayerNorm), orthogonal or "looks-linear" '
        "initialisation, GELU instead of ReLU; in a chaotic network (too large an initialisation), a smaller "
        "initialisation scale",
    ),
    AlertKind.VANISHING_JACOBIAN: AlertKindInfo(
        "Vanishing block Jacobians",
        "initialise at the activation's critical scale (orthogonal with nn.init.calculate_gain, He for ReLU), "
        "residual connections, normalisation layers; look at the named block first",
    ),
    AlertKind.EXPLODING_JACOBIAN: AlertKindInfo(
        "Exploding block Jacobians",
        "a smaller initialisation scale (orthogonal, He/Xavier), normalisation layers, residual branches scaled "
        "down (e.g. the last layer of each branch initialised at zero); look at the named block first",
    ),
    AlertKind.STOPPED_LAYER: AlertKindInfo(
        "Stopped layers",
        "the network collapsed (usually after a blow-up: dead ReLUs downstream pass no gradient back): a lower learning "
        "rate or a warm-up, gradient clipping, LeakyReLU/GELU; resume from a checkpoint from before the collapse",
    ),
    AlertKind.UPDATE_RATIO: AlertKindInfo(
        "Update-to-weight ratio out of band",
        "too large: lower the learning rate for those layers (or add warm-up); zero: check the optimizer's parameter "
        "groups and the schedule",
    ),
    AlertKind.GRADIENT_UNDERFLOW: AlertKindInfo(
        "Gradient underflow (fp16)",
        "precision='16-mixed' (float32 weights and a GradScaler) or bf16 instead of pure fp16; with a GradScaler, "
        "keep the loss scale up (find what overflows and forces it down: an unnormalised activation, a large loss "
        "term)",
    ),
    AlertKind.LOSS_SPIKE: AlertKindInfo(
        "Loss spikes",
        "LossSpikeGuard(action='skip') or 'rollback' to keep them out of the weights; resume with skip_batches to "
        "leave out the batches that caused them; a lower learning rate or more warm-up if they keep coming",
    ),
    AlertKind.LEARNING_RATE: AlertKindInfo(
        "Learning rate far too high",
        "lower the learning rate (10x or more), add a warm-up (LinearLR / OneCycleLR), clip gradients; check the "
        "rate that actually reaches each parameter group (a scheduler or scaling rule can multiply it)",
    ),
    AlertKind.NOT_IN_OPTIMIZER: AlertKindInfo(
        "Parameters left out of the optimizer",
        "return an optimizer over every trained parameter from configure_optimizers (self.parameters(), or add the "
        "missing module to a parameter group); freeze what should not learn with requires_grad_(False)",
    ),
    AlertKind.NO_GRADIENT: AlertKindInfo(
        "Parameters that never receive a gradient",
        "look for a .detach(), a torch.no_grad() block, .data, .item() or a NumPy round trip between those layers "
        "and the loss; a layer unused on purpose: freeze it (requires_grad_(False)) or leave it out with "
        "SetupCheck(ignore=[...])",
    ),
    AlertKind.GRADIENTS_NOT_RESET: AlertKindInfo(
        "Gradients never reset",
        "call optimizer.zero_grad() once per optimizer step in manual optimization (after step(), or before the "
        "backward passes of the next one); for gradient accumulation, zero after the step that applies them",
    ),
    AlertKind.VANISHING_THROUGH_TIME: AlertKindInfo(
        "Vanishing gradients through time",
        "a gated cell (nn.LSTM or nn.GRU instead of nn.RNN; an LSTM's forget-gate bias initialised to 1), an "
        "orthogonal or identity initialisation of the recurrent weight, shorter sequences or truncation, or "
        "attention over the past steps",
    ),
    AlertKind.EXPLODING_THROUGH_TIME: AlertKindInfo(
        "Exploding gradients through time",
        "clip gradients (AdaptiveClipping or Trainer(gradient_clip_val=...)), an orthogonal initialisation of the "
        "recurrent weight (spectral radius 1), a gated cell (nn.LSTM or nn.GRU), a lower learning rate, shorter "
        "truncation",
    ),
}


class AlertCause(_Name):
    """What a finding can be attributed to, when the callback could tell (``Alert.cause``; ``""`` when unknown)."""

    BAD_INPUT = "bad_input"
    EXPLODING_ACTIVATIONS = "exploding_activations"
    FORWARD_OP = "forward_op"
    LOSS_FUNCTION = "loss_function"
    BACKWARD_OP = "backward_op"
    DIVERGENCE = "divergence"
    HALF_PRECISION_UPDATE = "half_precision_update"
    POISONED_WEIGHTS = "poisoned_weights"


#: Each cause's own title and remedy, which the report and the message prefer to the kind's (a NaN born in an
#: exploding forward pass is not a data problem).
ALERT_CAUSES: dict[str, AlertKindInfo] = {
    AlertCause.BAD_INPUT: AlertKindInfo(
        "Non-finite input data", "find and fix the batch (data loading, preprocessing, a division by zero in a feature)"
    ),
    AlertCause.EXPLODING_ACTIVATIONS: AlertKindInfo(
        "Exploding activations",
        "check the weight initialisation (He/Xavier scale), add normalisation layers, lower the learning rate",
    ),
    AlertCause.FORWARD_OP: AlertKindInfo(
        "A forward operation produced NaN/Inf",
        "guard the operation named (log/sqrt/division of values near 0: clamp or add an epsilon)",
    ),
    AlertCause.LOSS_FUNCTION: AlertKindInfo(
        "The loss function produced NaN/Inf",
        "check the loss for log(0) or division by zero (use the numerically stable form, e.g. cross-entropy on logits)",
    ),
    AlertCause.BACKWARD_OP: AlertKindInfo(
        "The backward pass produced NaN/Inf",
        "an operation with an infinite derivative at the values it saw (sqrt/pow at 0, norm of a zero vector): add an "
        "epsilon",
    ),
    AlertCause.DIVERGENCE: AlertKindInfo(
        "Divergence: the learning rate is too high",
        "lower the learning rate (about 10x), add a warm-up, clip gradients (AdaptiveClipping); check the scale of "
        "the loss and the targets",
    ),
    AlertCause.HALF_PRECISION_UPDATE: AlertKindInfo(
        "The optimizer's float16 update produced NaN/Inf",
        "train with precision='16-mixed' (float32 weights and optimizer state, a GradScaler) or 'bf16-mixed'; in pure "
        "float16, raise Adam's eps to 1e-4 or more",
    ),
    AlertCause.POISONED_WEIGHTS: AlertKindInfo(
        "Non-finite weights",
        "resume from a clean checkpoint (action='rollback' keeps one in memory); lower the learning rate",
    ),
}

ALERT_KINDS: frozenset[str] = frozenset(str(kind) for kind in ALERT_KIND_INFO)  # plain strings, as alerts hold them


def plain_strings(value: Any) -> Any:
    """``value`` (a checkpointed state) with every :class:`AlertKind` / :class:`AlertCause` in it as its plain string:
    ``torch.load(weights_only=True)``, Lightning's default, refuses any class it does not know."""
    if isinstance(value, _Name):
        return str(value)
    if isinstance(value, dict):
        return {plain_strings(k): plain_strings(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple takes its fields one by one
        return type(value)(*(plain_strings(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(plain_strings(v) for v in value)
    return value


def alert_message(kind: str, finding: str, severity: str = "warning", cause: str = "") -> str:
    """The one way an alert message is made: the ``finding``, then, for a warning, the usual remedies of its
    ``cause`` (:data:`ALERT_CAUSES`) where it has an entry, else of its ``kind`` (:data:`ALERT_KIND_INFO`). An info
    finding asks for nothing, so it has no remedy."""
    if severity != "warning":
        return finding
    info = ALERT_CAUSES.get(cause) or ALERT_KIND_INFO.get(kind)
    return finding if info is None else f"{finding} Usual remedies: {info.remedy}."


@dataclass(frozen=True)
class Alert:
    """One finding of a gradwatch callback.

    Args:
        step: the trainer's ``global_step`` (optimizer steps completed) when the finding was made.
        kind: one of :data:`ALERT_KINDS`, e.g. ``"exploding_gradient"``.
        name: the layer, module or parameter concerned; ``""`` for a finding about the whole model.
        value: the measured quantity that crossed the threshold.
        threshold: the threshold it crossed.
        message: what is wrong, where, and the usual remedy.
        severity: ``"warning"`` (needs action; the default) or ``"info"`` (worth knowing: a handled transient, a
            stable sparse layer). Info alerts are logged at INFO level and listed apart in the report.
        onset: the step the condition began, when known and earlier than ``step`` (e.g. a gradient explosion
            between two logging steps); the report orders problems by it, so the first reads as the cause.
        cause: what the finding is attributed to, a key of :data:`ALERT_CAUSES` (``""`` when unknown).
        count: how many times the condition was seen in this episode (it came back before it had cleared for long,
            or, for events folded into one alert such as clipped spikes, how many there were).
        last_step: the step it was last seen, when later than ``step``.
    """

    step: int
    kind: str
    name: str
    value: float
    threshold: float
    message: str
    severity: Severity = "warning"
    onset: int | None = None
    cause: str = ""
    count: int = 1
    last_step: int | None = None

    @property
    def began(self) -> int:
        """The step the condition began: ``onset`` when known, else ``step``."""
        return self.step if self.onset is None else self.onset

    def __post_init__(self) -> None:
        # the contract's fields are plain strings, whether given as AlertKind/AlertCause members or not
        object.__setattr__(self, "kind", str(self.kind))
        object.__setattr__(self, "cause", str(self.cause))
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {', '.join(map(repr, SEVERITIES))}, got {self.severity!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        return cls(
            step=int(data["step"]),
            kind=str(data["kind"]),
            name=str(data["name"]),
            value=float(data["value"]),
            threshold=float(data["threshold"]),
            message=str(data["message"]),
            severity=data.get("severity", "warning"),
            onset=None if data.get("onset") is None else int(data["onset"]),
            cause=str(data.get("cause", "")),
            count=int(data.get("count", 1)),
            last_step=None if data.get("last_step") is None else int(data["last_step"]),
        )
