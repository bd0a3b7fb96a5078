import logging
import os
import warnings

import pytest
import torch

from tests.real_models.shim import ensure_torchvision_loads

# Before anything imports lightning: with the `real` extra installed on a CPU torch, torchmetrics imports the
# (CUDA-linked) torchvision, which cannot load without this (see tests/real_models/shim.py).
ensure_torchvision_loads()

# Two cores: keep each test process to one intra-op thread so parallel DDP ranks do not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*litlogger.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def gradwatch_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the package's alert log lines."""
    caplog.set_level(logging.WARNING, logger="lightning_gradwatch")
    return caplog
