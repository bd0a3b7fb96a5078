"""A checkpoint saved by the 0.1.0 code (tests/fixtures, written by tests/scripts/make_release_checkpoint.py) loads
into today's callbacks with nothing dropped, and the run resumes from it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_gradwatch import Alert, AlertKind, GradWatch
from tests.models import trainer_kwargs
from tests.scripts.make_release_checkpoint import callbacks, model

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_0_1_0.ckpt"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b or (a != a and b != b))  # NaN equals NaN here


def _saved() -> dict[str, Any]:
    return torch.load(FIXTURE, map_location="cpu", weights_only=False)


def test_every_callback_state_of_the_release_checkpoint_is_restored_as_saved() -> None:
    saved = _saved()["callbacks"]
    restored = callbacks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "could not be carried over" would be a warning
        for callback in restored:
            callback.load_state_dict(saved[callback.state_key])
    for callback in restored:
        assert _same(callback.state_dict(), saved[callback.state_key]), callback.state_key
    bundle = restored[0]
    assert isinstance(bundle, GradWatch)
    dead = [a for cb in bundle.gradwatch_callbacks for a in cb.alerts if a.kind == AlertKind.DEAD_NEURONS]
    assert [(a.name, a.step) for a in dead] == [("net.0", 26)]
    assert all(isinstance(a, Alert) for cb in bundle.gradwatch_callbacks for a in cb.alerts)


def test_a_run_resumes_from_the_release_checkpoint_without_repeating_its_alerts(tmp_path: Path) -> None:
    assert _saved()["global_step"] == 60
    restored = callbacks()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=80, callbacks=restored))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model(), ckpt_path=str(FIXTURE))
    assert trainer.global_step == 80
    assert not [w for w in caught if "carried over" in str(w.message)]
    bundle = restored[0]
    assert isinstance(bundle, GradWatch)
    dead = [a for cb in bundle.gradwatch_callbacks for a in cb.alerts if a.kind == AlertKind.DEAD_NEURONS]
    assert len(dead) == 1 and dead[0].step == 26  # the episode goes on: restored, not raised again


def test_a_checkpoint_saved_by_todays_code_loads_with_weights_only(tmp_path: Path) -> None:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=30, callbacks=callbacks()))
    trainer.fit(model())
    path = tmp_path / "today.ckpt"
    trainer.save_checkpoint(str(path))
    saved = torch.load(path, map_location="cpu", weights_only=True)  # what Lightning does by default
    states = saved["callbacks"]["GradWatch"]
    assert any(state["active_conditions"] for state in states.values())  # the dead-unit condition is in it
