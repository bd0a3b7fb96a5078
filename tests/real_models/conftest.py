"""Real-model tests: torchvision must be made loadable before anything imports it (timm does, and so does
``import lightning``, through torchmetrics, once torchvision is installed); tests/conftest.py does it first for the
whole suite, this is for a run that starts here."""

from tests.real_models.shim import ensure_torchvision_loads

ensure_torchvision_loads()
