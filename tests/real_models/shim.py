"""Let torchvision (and timm, which imports it) load on the CPU build of torch.

torchvision's wheels on the package index are linked against the CUDA build of torch. With ``torch==X+cpu`` its
C++ extension fails to load, and ``import torchvision`` then dies with ``operator torchvision::nms does not
exist`` while it registers fake kernels for its C++ ops. The models never call those ops (NMS is for detection),
so declaring the two op schemas the import looks up is enough. Where the extension does load (matching builds),
nothing is declared.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas


def ensure_torchvision_loads() -> None:
    """Declare ``torchvision::nms`` and ``torchvision::qnms`` when torchvision's C++ extension cannot load.

    Call before anything imports torchvision or timm. Idempotent; does nothing when torchvision is not installed.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    extension = next(iter(sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so"))), None)
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))  # torchvision loads the same file again later: a no-op
            return
        except (ImportError, OSError):
            pass  # built against another torch: declare the schemas instead
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
