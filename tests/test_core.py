"""The shared glue: callback ordering, merged TensorBoard layout, alert dedup and its state."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradwatch import Alert, GradientNormLogger
from lightning_gradwatch._layout import CHART_LINES, MAX_CHARTS, exact_tags, layer_charts, merge_layouts
from lightning_gradwatch.core import DeclaredState, Scalar, buffer, scalar
from lightning_gradwatch.core.callback import GradwatchCallback
from tests import tensorboard_events as tb
from tests.models import Classifier, mlp, trainer_kwargs

calls: list[str] = []


class Recorder(GradwatchCallback):
    def __init__(self, label: str, order: int, chart: str) -> None:
        super().__init__()
        self.label, self.hook_order, self.chart = label, order, chart  # type: ignore[misc]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(label=self.label)

    def _before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, step: Any
    ) -> None:
        calls.append(self.label)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        calls.append(f"setup {self.label}")

    def _tensorboard_layout(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {"gradwatch: gradients": {self.chart: ["Multiline", [f"^gradwatch/{self.label}"]]}}


class Plain(Callback):
    def on_before_optimizer_step(self, *args: Any) -> None:
        calls.append("plain")


def test_gradwatch_callbacks_run_in_hook_order_whatever_the_user_order(tmp_path: Any) -> None:
    calls.clear()
    callbacks = [Recorder("clip", 30, "c"), Plain(), Recorder("guard", 0, "g"), Recorder("norms", 10, "n")]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_steps=1))
    trainer.fit(Classifier(mlp(1)))
    # every callback set up exactly once; on the optimizer step the gradwatch callbacks run in hook_order
    assert calls[:3] == ["setup clip", "setup guard", "setup norms"]
    assert calls[3:] == ["guard", "norms", "clip", "plain"]
    [layout] = tb.layouts(tmp_path / "tb" / "version_0")  # one merged layout, written once
    assert set(layout["gradwatch: gradients"]) == {"g", "n", "c"}


def test_merge_layouts_combines_same_charts() -> None:
    merged = merge_layouts(
        [{"a": {"x": ["Multiline", ["^1"]]}}, {"a": {"x": ["Multiline", ["^2", "^1"]], "y": ["Multiline", ["^3"]]}}]
    )
    assert merged == {"a": {"x": ["Multiline", ["^1", "^2"]], "y": ["Multiline", ["^3"]]}}


def test_condition_alerts_once_per_onset_and_state_round_trips(tmp_path: Any, gradwatch_log: Any) -> None:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    cb = GradientNormLogger()

    def make(step: int) -> Any:
        return lambda: Alert(step, "saturation", "layer", 0.9, 0.5, f"saturated at {step}")

    for step, firing in [(0, True), (1, True), (2, False), (3, True), (4, True)]:
        cb._set_condition(trainer, "saturation", "layer", firing, make(step))
    # cleared for less than REARM_STEPS steps (the trainer has not moved): the same episode, seen twice
    assert [(a.step, a.count) for a in cb.alerts] == [(0, 2)]
    assert len(gradwatch_log.records) == 1

    restored = GradientNormLogger()
    restored.load_state_dict(cb.state_dict())
    assert restored.alerts == cb.alerts
    restored._set_condition(trainer, "saturation", "layer", True, make(5))  # still active: no repeat
    assert len(restored.alerts) == 1


def test_alert_is_frozen_and_round_trips() -> None:
    alert = Alert(3, "dead_neurons", "fc1", 0.4, 0.2, "msg")
    assert Alert.from_dict(alert.to_dict()) == alert
    with pytest.raises(AttributeError):
        alert.step = 4  # type: ignore[misc]


# -- custom-scalars charts -------------------------------------------------------------------------------------
def gpt_layers(blocks: int) -> list[str]:
    per_block = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    inner = [f"transformer.h.{i}.{m}" for i in range(blocks) for m in per_block]
    return ["transformer.wte", "transformer.wpe", *inner, "transformer.ln_f", "lm_head"]


@pytest.mark.parametrize(
    "names",
    [
        pytest.param([f"net.{i}" for i in range(0, 42, 2)], id="sequential-21"),
        pytest.param(gpt_layers(12), id="gpt-12-blocks"),
        pytest.param(["proj", "encoder.layers.0.linear1", "encoder.layers.1.linear1", "head"], id="small"),
        pytest.param([f"blocks.{i}.fc{j}" for i in range(200) for j in range(3)], id="600-layers"),
    ],
)
def test_layer_charts_keep_order_and_cover_every_layer_once(names: list[str]) -> None:
    charts = layer_charts(names)
    assert [n for _, chunk in charts for n in chunk] == names  # every layer once, in model order
    limit = max(CHART_LINES, math.ceil(len(names) / MAX_CHARTS))
    assert all(1 <= len(chunk) <= limit for _, chunk in charts)
    assert len(charts) <= MAX_CHARTS + 1 and len({title for title, _ in charts}) == len(charts)
    for _, chunk in charts:
        regex = re.compile(exact_tags("gradwatch/grad_norm/", chunk))
        assert [n for n in names if regex.search(f"gradwatch/grad_norm/{n}")] == chunk
        assert not regex.search(f"gradwatch/grad_norm/{chunk[0]}.weight")  # exact: no prefix matches


def test_layer_charts_split_along_the_module_tree() -> None:
    assert layer_charts([f"net.{i}" for i in range(0, 42, 2)])[0] == (
        "net: 0 … 12",
        [f"net.{i}" for i in range(0, 14, 2)],
    )
    charts = dict(layer_charts(gpt_layers(12)))
    # one chart per transformer block, never half a block
    assert charts["transformer.h.5: ln_1 … mlp.c_proj"] == [
        n for n in gpt_layers(12) if n.startswith("transformer.h.5.")
    ]
    assert layer_charts(["fc"]) == [("fc", ["fc"])] and layer_charts([]) == []
    assert [len(c) for _, c in layer_charts(["fc"] * 12)] == [6, 6]  # repeated names end, not recurse forever


def test_the_module_paths_of_0_1_0_still_import_the_moved_modules() -> None:
    import importlib

    import lightning_gradwatch as gw

    moved = [("nan_guard", "NaNGuard"), ("through_time", "GradientsThroughTime"), ("health_report", "HealthReport")]
    for old, name in moved:  # as `from lightning_gradwatch.nan_guard import NaNGuard` or a CLI class_path finds them
        module = importlib.import_module(f"lightning_gradwatch.{old}")
        assert getattr(module, name) is getattr(gw, name)


def test_each_trainer_has_its_own_session_on_it_and_a_copied_one_starts_empty(tmp_path: Path) -> None:
    import pickle

    from lightning_gradwatch.core import Session, session_of

    first, second = (pl.Trainer(**trainer_kwargs(tmp_path / str(i))) for i in range(2))
    assert session_of(first) is session_of(first) and session_of(first) is not session_of(second)
    session_of(first).metrics.values["x"] = 1.0
    copied = pickle.loads(pickle.dumps(session_of(first)))  # ddp_spawn pickles the Trainer
    assert isinstance(copied, Session) and copied.metrics.values == {}


def test_no_module_keeps_state_per_trainer() -> None:
    import importlib
    import pkgutil
    import weakref

    import lightning_gradwatch

    registries = []
    for info in pkgutil.walk_packages(lightning_gradwatch.__path__, "lightning_gradwatch."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, weakref.WeakKeyDictionary | weakref.WeakValueDictionary):
                registries.append(f"{info.name}.{name}")
    # what belongs to a model, not to a run: its one activation probe and the buffers it holds infinite by design
    assert sorted(registries) == [
        "lightning_gradwatch.activations._probe._PROBES",
        "lightning_gradwatch.guards._buffer_baseline._INFINITE_AT_START",
        "lightning_gradwatch.guards._buffer_baseline._SEEN",
    ]


@dataclass
class _Window(DeclaredState):
    steps: Scalar = scalar()
    worst: Scalar = scalar(-math.inf)
    ring: torch.Tensor = buffer()
    pushed: torch.Tensor = buffer(torch.int64)


@pytest.mark.parametrize("on_host", [True, False], ids=["host-path", "device-path"])
def test_declared_state_is_made_saved_and_restored_from_its_declaration(on_host: bool) -> None:
    device = torch.device("cpu")
    window = _Window.fresh(device, on_host, shapes={"ring": (4,)})
    assert _Window.scalar_names() == ("steps", "worst")
    assert isinstance(window.steps, float) is on_host and float(window.worst) == -math.inf
    assert window.ring.shape == (4,) and window.pushed.dtype == torch.int64
    window.steps, window.worst = window.steps + 3, 2.5 if on_host else torch.tensor(2.5)
    window.ring[1] = 7.0
    saved = window.to_state()
    assert set(saved) == {"steps", "worst", "ring", "pushed"} and all(t.device.type == "cpu" for t in saved.values())

    restored = _Window.fresh(device, not on_host, shapes={"ring": (4,)})  # saved on one path, loaded on the other
    restored.load(saved)
    assert restored.named([float(v) for v in restored.scalar_values()]) == {"steps": 3.0, "worst": 2.5}
    assert isinstance(restored.steps, float) is (not on_host) and restored.ring.tolist() == [0.0, 7.0, 0.0, 0.0]

    other_size = _Window.fresh(device, on_host, shapes={"ring": (8,)})
    other_size.load(saved)  # a ring of another size is left at its zeros; the scalars still fit
    assert float(other_size.steps) == 3.0 and other_size.ring.count_nonzero() == 0
    moved = window.placed(device, on_host=True)
    assert isinstance(moved.worst, float) and moved.on_host and moved.ring is not None
