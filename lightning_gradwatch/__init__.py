"""lightning-gradwatch: gradient-health callbacks for PyTorch Lightning."""

from lightning_gradwatch.adaptive_clipping import AdaptiveClipping
from lightning_gradwatch.alerts import ALERT_KINDS, Alert, AlertKind
from lightning_gradwatch.dead_neurons import DeadNeuronCallback
from lightning_gradwatch.gradient_norm import GradientNormLogger
from lightning_gradwatch.health_report import HealthReport
from lightning_gradwatch.nan_guard import NaNGuard
from lightning_gradwatch.preset import GradWatch, default_callbacks
from lightning_gradwatch.saturation import SaturationCallback

__version__ = "0.1.0"

__all__ = [
    "ALERT_KINDS",
    "AdaptiveClipping",
    "Alert",
    "AlertKind",
    "DeadNeuronCallback",
    "GradWatch",
    "GradientNormLogger",
    "HealthReport",
    "NaNGuard",
    "SaturationCallback",
    "__version__",
    "default_callbacks",
]
