"""Real architectures under GradWatch (see docs/real_models.md). Importing the package first makes torchvision
loadable on a CPU torch, before any of its modules imports lightning (whose torchmetrics imports torchvision)."""

from tests.real_models.shim import ensure_torchvision_loads

ensure_torchvision_loads()
