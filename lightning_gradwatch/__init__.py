"""lightning-gradwatch: gradient-health callbacks for PyTorch Lightning."""

from lightning_gradwatch.adaptive_clipping import AdaptiveClipping
from lightning_gradwatch.alerts import (
    ALERT_CAUSES,
    ALERT_KIND_INFO,
    ALERT_KINDS,
    Alert,
    AlertCause,
    AlertKind,
    AlertKindInfo,
    Severity,
)
from lightning_gradwatch.dead_neurons import DeadNeuronCallback
from lightning_gradwatch.gradient_geometry import GradientGeometry
from lightning_gradwatch.gradient_norm import GradientNormLogger
from lightning_gradwatch.health_report import HealthReport
from lightning_gradwatch.loss_spike_guard import LossSpikeGuard
from lightning_gradwatch.nan_guard import NaNGuard
from lightning_gradwatch.noise_scale import GradientNoiseScale
from lightning_gradwatch.preset import GradWatch, default_callbacks
from lightning_gradwatch.saturation import SaturationCallback
from lightning_gradwatch.setup_check import SetupCheck
from lightning_gradwatch.through_time import GradientsThroughTime

__version__ = "0.1.0"

__all__ = [
    "ALERT_CAUSES",
    "ALERT_KINDS",
    "ALERT_KIND_INFO",
    "AdaptiveClipping",
    "Alert",
    "AlertCause",
    "AlertKind",
    "AlertKindInfo",
    "DeadNeuronCallback",
    "GradWatch",
    "GradientGeometry",
    "GradientNoiseScale",
    "GradientNormLogger",
    "GradientsThroughTime",
    "HealthReport",
    "LossSpikeGuard",
    "NaNGuard",
    "SaturationCallback",
    "SetupCheck",
    "Severity",
    "__version__",
    "default_callbacks",
]
