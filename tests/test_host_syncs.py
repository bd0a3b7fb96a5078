"""The host-device syncs each callback adds, counted on CPU (see lightning_gradwatch/testing.py).

The target: nothing on a step that does not log, except NaNGuard's one flag per step in 32-bit and bf16 (under
fp16 it reads the GradScaler's own found-inf, which the scaler has already brought to the host); one transfer
per callback on a step that logs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradwatch import (
    AdaptiveClipping,
    DeadNeuronCallback,
    GradientNoiseScale,
    GradientNormLogger,
    GradWatch,
    NaNGuard,
    SaturationCallback,
)
from lightning_gradwatch.testing import HostReadCounter
from tests.models import IN_FEATURES, NUM_CLASSES, Classifier, classification_data, trainer_kwargs

STEPS = 40
PRESET_STEPS = 60  # the preset's activation window (6 samples, one every 5 steps) is full from step 25
LOG_EVERY = 5


def relu_then_tanh() -> nn.Module:
    """Something for every callback to measure: a rectifier for the dead-unit tally, a tanh for saturation."""
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, NUM_CLASSES)
    )


def counted_fit(
    tmp_path: Path, callbacks: list[Callback], precision: str, steps: int, accumulate: int = 1
) -> HostReadCounter:
    torch.manual_seed(0)
    counter = HostReadCounter()
    kwargs: dict[str, Any] = {"precision": precision}
    if precision == "16-mixed":  # a real GradScaler on CPU needs the plugin spelled out
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[counter.callback(), *callbacks],
            max_steps=steps,
            log_every_n_steps=LOG_EVERY,
            accumulate_grad_batches=accumulate,
            **kwargs,
        )
    )
    model = Classifier(relu_then_tanh(), data=classification_data(steps * accumulate * 32), lr=1e-3, optimizer="adam")
    with counter:
        trainer.fit(model)
    assert counter.steps == list(range(steps))  # one epoch: no epoch-end work inside a step
    return counter


_BASELINES: dict[tuple[str, int, int], dict[int, int]] = {}


def added_reads(
    tmp_path: Path, callbacks: list[Callback], precision: str, steps: int = STEPS, accumulate: int = 1
) -> tuple[dict[int, int], dict[int, int]]:
    """Host reads added per step by ``callbacks`` against the same fit without them: (non-logging steps, logging
    steps)."""
    key = (precision, steps, accumulate)
    if key not in _BASELINES:
        _BASELINES[key] = counted_fit(tmp_path / "none", [], precision, steps, accumulate).per_step()
    baseline = _BASELINES[key]
    counter = counted_fit(tmp_path / "with", callbacks, precision, steps, accumulate)
    added = {step: n - baseline[step] for step, n in counter.per_step().items()}
    assert len(counter.logging_steps) == steps // LOG_EVERY
    quiet = {s: n for s, n in added.items() if s not in counter.logging_steps}
    logging = {s: n for s, n in added.items() if s in counter.logging_steps}
    return quiet, logging


CALLBACKS: dict[str, Callable[[], list[Callback]]] = {
    "GradientNormLogger": lambda: [GradientNormLogger()],
    "DeadNeuronCallback": lambda: [DeadNeuronCallback(sample_every_n_steps=2, window=3)],
    "SaturationCallback": lambda: [SaturationCallback(sample_every_n_steps=2, window=3)],
    "AdaptiveClipping-zscore": lambda: [AdaptiveClipping()],
    "AdaptiveClipping-percentile": lambda: [AdaptiveClipping(mode="percentile")],
    "AdaptiveClipping-agc": lambda: [AdaptiveClipping(mode="agc")],
}


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_no_sync_on_steps_that_do_not_log_and_one_transfer_on_steps_that_do(
    tmp_path: Path, name: str, precision: str
) -> None:
    quiet, logging = added_reads(tmp_path, CALLBACKS[name](), precision)
    assert set(quiet.values()) == {0}
    # the activation callbacks' window (3 samples, one every 2 steps) is full from step 4: the first logging step
    assert logging == dict.fromkeys(logging, 1)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_nan_guard_reads_one_flag_per_step_except_under_a_grad_scaler(tmp_path: Path, precision: str) -> None:
    quiet, logging = added_reads(tmp_path, [NaNGuard()], precision)
    per_step = 0 if precision == "16-mixed" else 1
    assert set(quiet.values()) == {per_step}
    assert set(logging.values()) == {1}  # the logging step's values ride with the flag


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_preset_at_defaults(tmp_path: Path, precision: str) -> None:
    quiet, logging = added_reads(tmp_path, [GradWatch()], precision, PRESET_STEPS)
    assert set(quiet.values()) == {0 if precision == "16-mixed" else 1}
    # NaNGuard, GradientNormLogger and AdaptiveClipping transfer once each; the activation verdicts ride on the
    # guard's read (every step in 32-bit, every logging step under fp16) and add nothing
    assert logging == dict.fromkeys(logging, 3)


@pytest.mark.parametrize(
    ("name", "make", "per_step"),
    [
        ("GradientNormLogger", lambda: [GradientNormLogger()], 0),
        ("DeadNeuronCallback", CALLBACKS["DeadNeuronCallback"], 0),
        ("NaNGuard", lambda: [NaNGuard()], 1),
        ("GradWatch", lambda: [GradWatch()], 1),
    ],
)
def test_budget_is_per_optimizer_step_under_gradient_accumulation(
    tmp_path: Path, name: str, make: Callable[[], list[Callback]], per_step: int
) -> None:
    # four micro-batches per optimizer step: the budget is per optimizer step, not per micro-batch
    quiet, logging = added_reads(tmp_path, make(), "32-true", accumulate=4)
    assert set(quiet.values()) == {per_step}, name
    assert min(logging.values()) >= 1, name


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_noise_scale_reads_nothing_on_steps_that_do_not_log_and_once_on_steps_that_do(
    tmp_path: Path, precision: str
) -> None:
    # it needs two batch sizes: gradient accumulation here (the first micro-batch against the whole step)
    quiet, logging = added_reads(tmp_path, [GradientNoiseScale()], precision, accumulate=4)
    assert set(quiet.values()) == {0}
    assert logging == dict.fromkeys(logging, 1)


def test_the_counter_sees_a_host_tensor_copied_to_the_device() -> None:
    # from pageable memory such a copy waits for the stream: set_sync_debug_mode reports it on a GPU, where NaNGuard
    # once made one every step (a host False for "no state to screen", moved to the gradients' device)
    device = torch.device("cpu")  # a GPU run's device, as the code under test receives it
    counter = HostReadCounter()
    with counter:
        counter.step = 0
        on_device = torch.zeros((), device=device)  # made there: no copy
        uploaded = torch.zeros(()).to(device)  # made on the host, then copied: counted
        torch.zeros(3).to(device, non_blocking=True)  # an asynchronous copy: not a sync
        on_device.copy_(torch.ones(()))  # a host tensor copied into a device one: counted
        uploaded.add_(1).item()  # the copy is a device tensor, as on a GPU: reading it is counted
        torch.ones(()).to("cpu")  # host to host: nothing
    assert [site.split(" at ")[0] for site in counter.reads[0]] == ["to", "copy_", "item"]
