"""SaturationCallback in real Trainer fits on CPU."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradwatch import SaturationCallback
from tests import tensorboard_events as tb
from tests.activation_models import Net, fit, no_probe_left
from tests.models import IN_FEATURES, NUM_CLASSES, Classifier, TinyLSTM, classification_data, mlp, trainer_kwargs


def saturation_scalars(tmp_path: Any) -> dict[str, list[float]]:
    events = tb.scalars(tmp_path / "tb" / "version_0")
    return {t: [v for _, v in e] for t, e in events.items() if t.startswith("gradwatch/saturation/")}


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("style", ["module", "functional", "torch", "method"])
def test_saturation_found_whichever_way_it_is_written(tmp_path: Any, act: str, style: str) -> None:
    torch.manual_seed(0)
    net = Net(style, act=act, gain=12.0)  # weights far too large
    callback = SaturationCallback(sample_every_n_steps=1, window=2)
    model = Classifier(net, lr=0.0)
    fit(tmp_path, model, [callback], max_steps=2)
    fractions = saturation_scalars(tmp_path)
    assert set(fractions) == {"gradwatch/saturation/net.fc1", "gradwatch/saturation/net.fc2"}
    assert fractions["gradwatch/saturation/net.fc1"][0] > 0.2
    assert [a.name for a in callback.alerts][:1] == ["net.fc1"]
    assert act in callback.alerts[0].message
    assert no_probe_left(model)


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
        results.append(saturation_scalars(tmp_path / style)["gradwatch/saturation/net.fc1"])
    assert results[0] == results[1] and 0 < results[0][0] < 1


def test_fraction_is_exact_and_margin_is_honoured(tmp_path: Any) -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(IN_FEATURES, 4), nn.Linear(4, NUM_CLASSES)
            with torch.no_grad():
                self.fc.weight.zero_()
                self.fc.bias.copy_(torch.tensor([0.0, 3.0, -5.0, 2.0]))  # tanh: 0, 0.995, -1.0, 0.964

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.fc(x)))

    tight, loose = (
        SaturationCallback(margin=0.01, sample_every_n_steps=1, window=1),
        SaturationCallback(margin=0.05, sample_every_n_steps=1, window=1),
    )
    fit(tmp_path, Classifier(Fixed(), lr=0.0), [tight, loose], max_steps=1)
    assert [a.value for a in tight.alerts] == [0.5] and [a.value for a in loose.alerts] == [0.75]
    assert tight.alerts[0].severity == "info"  # half of a layer, stable


def test_a_layer_saturated_through_and_through_is_a_warning_with_its_remedy(tmp_path: Any) -> None:
    torch.manual_seed(0)
    callback = SaturationCallback(sample_every_n_steps=1, window=2)
    fit(tmp_path, Classifier(Net("torch", act="tanh", gain=200.0), lr=0.0), [callback], max_steps=3)
    alert = callback.alerts[0]
    assert alert.severity == "warning" and alert.value >= 0.9 and "normalisation" in alert.message


def test_sigmoid_output_of_the_model_is_not_reported(tmp_path: Any) -> None:
    """A binary classifier's probabilities may sit near 0 and 1 when it is confident: that is not saturation."""

    class Binary(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(IN_FEATURES, 32), nn.Linear(32, 1)
            with torch.no_grad():
                self.head.weight.mul_(50)  # very confident from the start

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.head(torch.tanh(self.fc(x)))).squeeze(-1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.binary_cross_entropy(self(x), (y % 2).float())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(classification_data(), batch_size=32)

    callback = SaturationCallback(sample_every_n_steps=1, window=2)
    fit(tmp_path, Binary(), [callback], max_steps=4)
    assert callback.alerts == [] and set(saturation_scalars(tmp_path)) == {"gradwatch/saturation/fc"}


@pytest.mark.parametrize(
    ("make", "alerts"),
    [
        pytest.param(lambda: Classifier(mlp(4, act=nn.Tanh)), False, id="tanh-mlp-default-init"),
        pytest.param(lambda: Classifier(mlp(3, act=nn.Sigmoid)), False, id="sigmoid-mlp-default-init"),
        pytest.param(lambda: Classifier(mlp(4, act=nn.Tanh), lr=1e-3, optimizer="adam"), False, id="tanh-mlp-adam"),
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


def test_lstm_gates_are_invisible_and_never_reported(tmp_path: Any) -> None:
    with torch.no_grad():
        model = Classifier(TinyLSTM(), data=classification_data(seq_len=8))
        for p in model.net.lstm.parameters():
            p.mul_(30)  # every gate saturated, inside the fused kernel
    callback = SaturationCallback(sample_every_n_steps=1, window=2)
    fit(tmp_path, model, [callback], max_steps=4)
    assert callback.alerts == [] and saturation_scalars(tmp_path) == {}


def test_saturation_counts_resume_from_a_checkpoint(tmp_path: Any) -> None:
    net = Net("torch", act="tanh", gain=12.0)
    callback = SaturationCallback(sample_every_n_steps=1, window=4)
    trainer = fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=6)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"][callback.state_key]
    assert state["samples"] == 6 and state["kinds"][:2] == [["tanh"], ["tanh"]]
    assert [row[0] for row in state["totals"]] == [32 * 64] * 4 and (state["saturated"][:, 0] > 0).all()
    first = saturation_scalars(tmp_path)["gradwatch/saturation/net.fc1"]

    resumed = SaturationCallback(sample_every_n_steps=1, window=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=8))
    trainer.fit(Classifier(net, lr=0.0), ckpt_path=tmp_path / "a.ckpt")
    after = saturation_scalars(tmp_path / "b")["gradwatch/saturation/net.fc1"]
    # the window slides on from the checkpoint's: half of it resumed at step 6, all of it new at step 7
    assert len(after) == 2 and after[0] == pytest.approx(first[-1], rel=0.1)
    assert [a.name for a in resumed.alerts] == [a.name for a in callback.alerts]  # conditions active: no repeat


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": 2}, "threshold"),
        ({"margin": 0.5}, "margin"),
        ({"margin": 0}, "margin"),
        ({"margin": True}, "margin"),
        ({"sample_every_n_steps": -1}, "sample_every_n_steps"),
        ({"window": 1.5}, "window"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SaturationCallback(**kwargs)
