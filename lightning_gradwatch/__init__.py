"""lightning-gradwatch: gradient-health callbacks for PyTorch Lightning."""

import sys as _sys

from lightning_gradwatch import activations as _activations
from lightning_gradwatch import diagnosis as _diagnosis
from lightning_gradwatch import geometry as _geometry
from lightning_gradwatch import gradients as _gradients
from lightning_gradwatch import guards as _guards
from lightning_gradwatch.activations.dead_neurons import DeadNeuronCallback
from lightning_gradwatch.activations.saturation import SaturationCallback
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
from lightning_gradwatch.diagnosis.health_report import HealthReport
from lightning_gradwatch.diagnosis.setup_check import SetupCheck
from lightning_gradwatch.geometry.gradient_geometry import GradientGeometry
from lightning_gradwatch.geometry.through_time import GradientsThroughTime
from lightning_gradwatch.gradients.adaptive_clipping import AdaptiveClipping
from lightning_gradwatch.gradients.gradient_norm import GradientNormLogger
from lightning_gradwatch.gradients.noise_scale import GradientNoiseScale
from lightning_gradwatch.guards.loss_spike_guard import LossSpikeGuard
from lightning_gradwatch.guards.nan_guard import NaNGuard
from lightning_gradwatch.preset import GradWatch, default_callbacks

__version__ = "0.1.0"

# The module paths of 0.1.0 (``from lightning_gradwatch.nan_guard import NaNGuard``, a LightningCLI
# ``class_path: lightning_gradwatch.nan_guard.NaNGuard``) stay importable: each names its module in its family now.
_MOVED = {
    "nan_guard": _guards.nan_guard,
    "loss_spike_guard": _guards.loss_spike_guard,
    "gradient_norm": _gradients.gradient_norm,
    "adaptive_clipping": _gradients.adaptive_clipping,
    "noise_scale": _gradients.noise_scale,
    "dead_neurons": _activations.dead_neurons,
    "saturation": _activations.saturation,
    "gradient_geometry": _geometry.gradient_geometry,
    "through_time": _geometry.through_time,
    "setup_check": _diagnosis.setup_check,
    "health_report": _diagnosis.health_report,
}
for _name, _module in _MOVED.items():
    _sys.modules[f"{__name__}.{_name}"] = _module

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
