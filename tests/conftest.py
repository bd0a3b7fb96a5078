import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack

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


@pytest.fixture
def decide_on_host() -> Iterator[Callable[[bool], None]]:
    """``decide_on_host(False)``: from there on in the test, a CPU takes the device path a GPU takes
    (``lightning_gradwatch.core.device_path``); ``decide_on_host(True)``: the host path again (the default)."""
    from lightning_gradwatch.core import device_path  # here: nothing may import lightning before the shim above

    with ExitStack() as stack:
        yield lambda host: stack.enter_context(device_path(not host))
