"""DeadNeuronCallback and SaturationCallback in real Trainer fits on CPU, plus their pure functions."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradwatch import DeadNeuronCallback, SaturationCallback
from lightning_gradwatch.functional import alive_units, saturated_count, saturation_bound
from tests import tensorboard_events as tb
from tests.distributed import run_ddp_script
from tests.models import (
    IN_FEATURES,
    NUM_CLASSES,
    Classifier,
    TinyLSTM,
    classification_data,
    image_data,
    mlp,
    resnet,
    trainer_kwargs,
)


# -- pure functions -------------------------------------------------------------------------------------------
def test_alive_units_over_samples_and_positions() -> None:
    linear_out = torch.tensor([[[-1.0, 2.0, -3.0], [-1.0, -2.0, -3.0]], [[-1.0, -2.0, 0.0], [-1.0, -2.0, -3.0]]])
    assert alive_units(linear_out, -1).tolist() == [False, True, False]  # 0 is not positive
    conv_out = torch.full((2, 3, 4, 4), -1.0)
    conv_out[1, 2, 3, 3] = 0.5
    assert alive_units(conv_out, 1).tolist() == [False, False, True]


def test_saturation_bounds_and_counts() -> None:
    assert torch.sigmoid(torch.tensor(saturation_bound("sigmoid", 0.01))).item() == pytest.approx(0.99)
    assert math.tanh(saturation_bound("tanh", 0.01)) == pytest.approx(0.99)
    x = torch.tensor([0.0, 2.0, -2.7, 3.0, -10.0])
    assert saturated_count(x, saturation_bound("tanh", 0.01)).item() == 3
    with pytest.raises(ValueError, match="`kind`"):
        saturation_bound("relu", 0.01)


# -- models -----------------------------------------------------------------------------------------------------
class Net(nn.Module):
    """Two hidden layers; the activation is applied as a module or as one of the functional spellings."""

    def __init__(self, style: str, act: str = "relu", width: int = 64, gain: float = 1.0) -> None:
        super().__init__()
        self.style, self.act = style, act
        self.fc1, self.fc2, self.head = (
            nn.Linear(IN_FEATURES, width),
            nn.Linear(width, width),
            nn.Linear(width, NUM_CLASSES),
        )
        self.module_act = {"relu": nn.ReLU(inplace=True), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}[act]
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.mul_(gain)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "module":
            return self.module_act(x)
        if self.act == "relu":
            return {
                "functional": F.relu,
                "torch": torch.relu,
                "method": lambda t: t.relu(),
                "inplace": lambda t: F.relu(t, inplace=True),
            }[self.style](x)
        if self.act == "tanh":
            return {"functional": F.tanh, "torch": torch.tanh, "method": lambda t: t.tanh()}[self.style](x)
        return {"functional": F.sigmoid, "torch": torch.sigmoid, "method": lambda t: t.sigmoid()}[self.style](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.activation(self.fc2(self.activation(self.fc1(x)))))


def kill(layer: nn.Linear, fraction: float) -> None:
    with torch.no_grad():
        layer.bias[: int(layer.out_features * fraction)] = -1e3


def fit(tmp_path: Any, model: pl.LightningModule, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model)
    return trainer


def no_probe_left(model: nn.Module) -> bool:
    hooks = any(m._forward_hooks for m in model.modules())
    return not hooks and torch._C._len_torch_function_stack() == 0


# -- DeadNeuronCallback -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["module", "functional", "torch", "method", "inplace"])
def test_dead_units_found_whichever_way_relu_is_written(tmp_path: Any, style: str) -> None:
    net = Net(style)
    kill(net.fc1, 0.5)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    model = Classifier(net, lr=0.0)  # frozen weights: the dead fraction is exactly known
    fit(tmp_path, model, [callback], max_steps=6)
    events = tb.scalars(tmp_path / "tb" / "version_0")
    assert [v for _, v in events["gradwatch/dead_fraction/net.fc1"]] == [0.5, 0.5]
    assert "gradwatch/dead_fraction/net.head" not in events  # not followed by a rectifier
    [alert] = callback.alerts  # the persisting condition is reported once
    assert alert.kind == "dead_neurons" and alert.name == "net.fc1" and alert.value == 0.5 and alert.threshold == 0.3
    assert "LeakyReLU" in alert.message and "learning rate" in alert.message
    assert no_probe_left(model)


def test_unit_that_dies_later_is_caught(tmp_path: Any) -> None:
    def kill_at_step_12(module: Classifier, step: int) -> None:
        if step == 12:
            kill(module.net.fc1, 0.5)  # e.g. one outlier batch with a high learning rate

    callback = DeadNeuronCallback(sample_every_n_steps=1, window=4)
    fit(tmp_path, Classifier(Net("functional"), lr=0.01, hook=kill_at_step_12), [callback], max_steps=24)
    [alert] = callback.alerts
    assert alert.name == "net.fc1" and 12 < alert.step <= 20


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Classifier(mlp(4, width=128)), id="relu-mlp-sgd"),
        pytest.param(lambda: Classifier(mlp(4, width=128), lr=1e-3, optimizer="adam"), id="relu-mlp-adam"),
        pytest.param(lambda: Classifier(resnet(), data=image_data(), lr=0.05), id="resnet-sgd"),
        pytest.param(lambda: Classifier(resnet(), data=image_data(), lr=1e-3, optimizer="adam"), id="resnet-adam"),
    ],
)
def test_healthy_relu_networks_do_not_alert(tmp_path: Any, make: Any) -> None:
    callback = DeadNeuronCallback(sample_every_n_steps=2, window=5)
    model = make()
    fit(tmp_path, model, [callback], max_steps=80)
    assert callback.alerts == []
    layers = {t for t in tb.scalars(tmp_path / "tb" / "version_0") if t.startswith("gradwatch/dead_fraction/")}
    assert len(layers) >= 3  # conv -> bn -> relu is attributed to the conv
    assert no_probe_left(model)


def test_high_learning_rate_kills_units_and_is_reported(tmp_path: Any) -> None:
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=5)
    fit(tmp_path, Classifier(mlp(4, width=128), lr=2.0), [callback], max_steps=40)
    assert {a.name for a in callback.alerts} & {"net.2", "net.4", "net.6"}


def test_sampling_cadence_and_no_counting_in_validation(tmp_path: Any) -> None:
    callback = DeadNeuronCallback(sample_every_n_steps=3, window=2)
    calls: list[int] = []
    sink = callback._probe.sink
    callback._probe.sink = lambda *a: (calls.append(1), sink(*a))
    model = Classifier(Net("functional"))
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[callback],
            max_steps=12,
            limit_val_batches=3,
            num_sanity_val_steps=2,
            val_check_interval=4,
        )
    )
    trainer.fit(model)
    # sampled steps 0, 3, 6, 9: two ReLU calls each, none from the sanity check or the validation batches
    assert len(calls) == 4 * 2
    assert [s for s, _ in tb.scalars(tmp_path / "tb" / "version_0")["gradwatch/dead_fraction/net.fc1"]] == [3, 9]
    assert no_probe_left(model)


def test_probe_removed_when_training_fails(tmp_path: Any) -> None:
    class Fails(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self(batch[0])
            raise RuntimeError("boom")  # after the forward pass, before backward

    model = Fails(Net("functional"))
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, model, [DeadNeuronCallback(sample_every_n_steps=1)], max_steps=3)
    assert no_probe_left(model)


def test_dead_tallies_resume_from_a_checkpoint(tmp_path: Any) -> None:
    net = Net("functional")
    kill(net.fc1, 0.5)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=4)
    trainer = fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=6)  # 6 = one check + 2 into the next
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"][callback.state_key]
    assert state["batches_in_window"] == 2 and state["alive"]["net.fc1"].sum().item() == 32

    resumed = DeadNeuronCallback(sample_every_n_steps=1, window=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=8))
    trainer.fit(Classifier(net, lr=0.0), ckpt_path=tmp_path / "a.ckpt")
    # the window started before the checkpoint completes after it; the condition was active already: no repeat
    assert [s for s, _ in tb.scalars(tmp_path / "b" / "tb" / "version_0")["gradwatch/dead_fraction/net.fc1"]] == [7]
    assert [a.step for a in resumed.alerts] == [4]  # global_step after the first window's last step


def test_ddp_unit_alive_on_one_rank_only_is_alive(tmp_path: Any) -> None:
    rank0, rank1 = run_ddp_script("ddp_dead_neurons.py", tmp_path)
    # units: 0 alive on rank 1's data only, 1 and 2 dead everywhere, 3 alive everywhere -> 2 of 4 dead
    assert rank0["alerts"] == rank1["alerts"]
    assert [(a["name"], a["value"]) for a in rank0["alerts"]] == [("net.0", 0.5)]
    assert rank0["local_dead_fraction"] == 0.75  # what rank 0 alone would have concluded


# -- SaturationCallback -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("style", ["module", "functional", "torch", "method"])
def test_saturation_found_whichever_way_it_is_written(tmp_path: Any, act: str, style: str) -> None:
    torch.manual_seed(0)
    net = Net(style, act=act, gain=12.0)  # weights far too large
    callback = SaturationCallback(sample_every_n_steps=1, window=2)
    fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=2)
    events = tb.scalars(tmp_path / "tb" / "version_0")
    fractions = {t: v[0][1] for t, v in events.items() if t.startswith("gradwatch/saturation/")}
    assert set(fractions) == {"gradwatch/saturation/net.fc1", "gradwatch/saturation/net.fc2"}
    assert fractions["gradwatch/saturation/net.fc1"] > 0.2
    assert [a.name for a in callback.alerts][:1] == ["net.fc1"]
    assert act in callback.alerts[0].message and "normalisation" in callback.alerts[0].message


def test_same_fractions_for_module_and_functional_forms(tmp_path: Any) -> None:
    results = []
    for style in ("module", "torch"):
        torch.manual_seed(0)
        net = Net(style, act="tanh", gain=4.0)
        fit(
            tmp_path / style,
            Classifier(net, lr=0.0),
            [SaturationCallback(sample_every_n_steps=1, window=3)],
            max_steps=3,
        )
        results.append(tb.scalars(tmp_path / style / "tb" / "version_0")["gradwatch/saturation/net.fc1"])
    assert results[0] == results[1] and 0 < results[0][0][1] < 1


@pytest.mark.parametrize(
    ("make", "alerts"),
    [
        pytest.param(lambda: Classifier(mlp(4, act=nn.Tanh)), False, id="tanh-mlp-default-init"),
        pytest.param(lambda: Classifier(mlp(3, act=nn.Sigmoid)), False, id="sigmoid-mlp-default-init"),
        pytest.param(lambda: Classifier(mlp(4, act=nn.Tanh, init_gain=5 * 3**-0.5)), True, id="tanh-mlp-5x-init"),
        pytest.param(
            lambda: Classifier(TinyLSTM(), data=classification_data(seq_len=8), lr=1e-3, optimizer="adam"),
            False,
            id="lstm-fused",
        ),
    ],
)
def test_saturation_defaults(tmp_path: Any, make: Any, alerts: bool) -> None:
    callback = SaturationCallback(sample_every_n_steps=2, window=5)
    fit(tmp_path, make(), [callback], max_steps=60)
    assert bool(callback.alerts) is alerts
    if alerts:
        assert all(a.kind == "saturation" and a.name.startswith("net.") for a in callback.alerts)


# -- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "argument"),
    [
        (DeadNeuronCallback, {"threshold": 0.0}, "threshold"),
        (DeadNeuronCallback, {"threshold": 1.5}, "threshold"),
        (DeadNeuronCallback, {"sample_every_n_steps": 0}, "sample_every_n_steps"),
        (DeadNeuronCallback, {"window": -2}, "window"),
        (SaturationCallback, {"threshold": -0.1}, "threshold"),
        (SaturationCallback, {"margin": 0.5}, "margin"),
        (SaturationCallback, {"margin": 0}, "margin"),
        (SaturationCallback, {"window": 1.5}, "window"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(cls: type, kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        cls(**kwargs)
