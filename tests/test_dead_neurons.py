"""DeadNeuronCallback in real Trainer fits on CPU (and its probe on plain forward passes)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradwatch import DeadNeuronCallback, SaturationCallback
from lightning_gradwatch.activations._probe import probe_for
from tests import tensorboard_events as tb
from tests.activation_models import Net, fit, kill, no_probe_left
from tests.distributed import run_ddp_script
from tests.models import IN_FEATURES, NUM_CLASSES, Classifier, image_data, mlp, resnet, trainer_kwargs


class Recorder(DeadNeuronCallback):
    """Records which layers' rectifier calls were kept (hidden) without going through a Trainer."""

    def __init__(self) -> None:
        super().__init__(sample_every_n_steps=1, window=1)
        self.kept: list[str] = []
        self.measured = 0

    def _measure(self, layer: int, kind: str, pre_activation: torch.Tensor) -> Any:
        self.measured += 1
        return super()._measure(layer, kind, pre_activation)

    def _accumulate(self, layer: int, kind: str, stat: torch.Tensor) -> None:
        self.kept.append(self._layers[layer].name)
        super()._accumulate(layer, kind, stat)


def probe_forward(model: nn.Module, x: torch.Tensor, *callbacks: Recorder) -> torch.Tensor:
    for callback in callbacks:
        callback._attach(model)
    try:
        return model(x)
    finally:
        for callback in callbacks:
            callback._detach()


# -- the probe ---------------------------------------------------------------------------------------------------
def test_rectifier_on_the_output_is_not_a_hidden_unit() -> None:
    class ReluOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.head = nn.Linear(IN_FEATURES, 8), nn.Linear(8, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.head(F.relu(self.fc1(x))))  # e.g. a non-negative regression output

    model, recorder = ReluOut(), Recorder()
    probe_forward(model, torch.randn(5, IN_FEATURES), recorder)
    assert recorder.measured == 2 and recorder.kept == ["fc1"]
    assert no_probe_left(model)


def test_conv_bn_relu_is_reported_under_the_conv_and_residual_sums_are_not_counted() -> None:
    model, recorder = resnet(channels=8, blocks=1), Recorder()
    probe_forward(model, torch.randn(2, 3, 8, 8), recorder)
    # net.0 conv -> net.1 bn -> relu; block: conv1 -> bn1 -> relu; relu(x + bn2(conv2)) is a residual sum
    assert recorder.kept == ["0", "3.conv1"]


def test_one_probe_per_model_shared_by_both_callbacks() -> None:
    model = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    depth: list[int] = []
    model[2].register_forward_pre_hook(lambda *_: depth.append(torch._C._len_torch_function_stack()))
    dead, saturation = DeadNeuronCallback(), SaturationCallback()
    dead._attach(model)
    saturation._attach(model)
    model(torch.randn(3, IN_FEATURES))
    assert depth == [1] and probe_for(model).subscribers == [dead, saturation]
    assert sum(len(m._forward_hooks) for m in model.modules()) == 3  # one per Linear, not one per callback
    dead._detach()
    assert torch._C._len_torch_function_stack() == 1  # still watching for the saturation callback
    saturation._detach()
    assert no_probe_left(model)


# -- real fits ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["module", "functional", "torch", "method", "inplace", "relu6", "leaky0"])
def test_dead_units_found_whichever_way_relu_is_written(tmp_path: Any, style: str) -> None:
    net = Net(style)
    kill(net.fc1, 0.5)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    model = Classifier(net, lr=0.0)  # frozen weights: the dead fraction is exactly known
    fit(tmp_path, model, [callback], max_steps=6)
    events = tb.scalars(tmp_path / "tb" / "version_0")
    # a verdict on every logging step once the window holds 3 samples (steps 2 to 5)
    assert [v for _, v in events["gradwatch/dead_fraction/net.fc1"]] == [0.5] * 4
    assert "gradwatch/dead_fraction/net.head" not in events  # not followed by a rectifier
    [alert] = callback.alerts  # the persisting condition is reported once
    assert alert.kind == "dead_neurons" and alert.name == "net.fc1" and alert.value == 0.5 and alert.threshold == 0.3
    assert alert.severity == "info" and "has not grown" in alert.message  # half a layer, stable: worth knowing
    assert no_probe_left(model)


def test_a_layer_most_of_which_is_dead_is_a_warning_with_its_remedy(tmp_path: Any) -> None:
    net = Net("functional")
    kill(net.fc1, 0.95)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=6)
    [alert] = callback.alerts  # no info before the warning: the warning says it all
    assert alert.severity == "warning" and alert.name == "net.fc1" and alert.value == pytest.approx(60 / 64)
    assert "LeakyReLU" in alert.message and "learning rate" in alert.message and "He" in alert.message


def test_a_growing_dead_fraction_turns_into_a_warning(tmp_path: Any) -> None:
    def kill_more(module: Classifier, step: int) -> None:
        if step == 10:
            kill(module.net.fc1, 0.7)

    net = Net("functional")
    kill(net.fc1, 0.4)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    fit(tmp_path, Classifier(net, lr=0.0, hook=kill_more), [callback], max_steps=20)
    assert [(a.severity, a.value) for a in callback.alerts] == [("info", 25 / 64), ("warning", 44 / 64)]


class FallingLoss(Classifier):
    """Frozen weights (the dead fraction is exactly known), but the loss it reports falls 5% a step, as a training
    loss does."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 0.95**self.global_step


def _kill_at_step_10(module: Classifier, step: int) -> None:
    if step == 10:
        kill(module.net.fc1, 0.7)


def test_units_that_die_while_the_loss_keeps_falling_are_info(tmp_path: Any) -> None:
    """A layer shedding units the task does not need (DistilBERT's ReLU head over a nearly constant [CLS] vector)
    while the loss falls is worth knowing, not a warning; the same death with a flat loss is the warning above."""
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    fit(tmp_path, FallingLoss(Net("functional"), lr=0.0, hook=_kill_at_step_10), [callback], max_steps=20)
    [alert] = callback.alerts
    assert alert.severity == "info" and alert.value == pytest.approx(44 / 64)
    assert "grew from 0%, but the training loss kept improving" in alert.message


def test_units_that_die_while_the_loss_stays_flat_are_a_warning(tmp_path: Any) -> None:
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    fit(tmp_path, Classifier(Net("functional"), lr=0.0, hook=_kill_at_step_10), [callback], max_steps=20)
    [alert] = callback.alerts
    assert alert.severity == "warning" and alert.value == pytest.approx(44 / 64) and "LeakyReLU" in alert.message


def test_without_a_guard_verdicts_wait_for_a_logging_step_and_the_end_of_training(tmp_path: Any) -> None:
    net = Net("functional")
    kill(net.fc1, 0.5)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=13, log_every_n_steps=5)
    # the window holds 3 samples from step 2 on; with no NaNGuard read to ride on, the verdicts come at the logging
    # steps 4 and 9, and at the end of training for the samples since (Lightning's logging step is 13 there)
    events = tb.scalars(tmp_path / "tb" / "version_0")["gradwatch/dead_fraction/net.fc1"]
    assert events == [(4, 0.5), (9, 0.5), (13, 0.5)]
    [alert] = callback.alerts
    assert alert.step == 5 and "over the last 3 sampled batches" in alert.message


def test_with_the_guard_verdicts_ride_on_its_read_every_sampled_step(tmp_path: Any) -> None:
    from lightning_gradwatch import NaNGuard

    net = Net("functional")
    kill(net.fc1, 0.95)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=3)
    fit(tmp_path, Classifier(net, lr=0.0), [NaNGuard(), callback], max_steps=13, log_every_n_steps=50)
    [alert] = callback.alerts  # judged at step 2 (the third sample), long before the logging step 49
    assert alert.step == 3 and alert.severity == "warning"


def test_own_logging_cadence_overrides_the_trainers(tmp_path: Any) -> None:
    net = Net("functional")
    kill(net.fc1, 0.5)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=2, log_every_n_steps=4)
    fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=12, log_every_n_steps=50)
    events = tb.scalars(tmp_path / "tb" / "version_0")["gradwatch/dead_fraction/net.fc1"]
    assert [step for step, _ in events] == [3, 7, 11]


def test_leaky_relu_units_never_die(tmp_path: Any) -> None:
    class Leaky(Net):
        def activation(self, x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(x, 0.01)

    net = Leaky("functional")
    kill(net.fc1, 0.5)
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=2)
    fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=4)
    assert callback.alerts == [] and not any("dead_fraction" in t for t in tb.scalars(tmp_path / "tb" / "version_0"))


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
    assert len(layers) >= 3
    assert not any(t.endswith(("net.1", ".bn1")) for t in layers)  # conv -> bn -> relu is reported as the conv
    assert no_probe_left(model)


def test_high_learning_rate_kills_units_and_is_reported(tmp_path: Any) -> None:
    callback = DeadNeuronCallback(sample_every_n_steps=1, window=5)
    fit(tmp_path, Classifier(mlp(4, width=128), lr=2.0), [callback], max_steps=40)
    assert {a.name for a in callback.alerts} & {"net.2", "net.4", "net.6"}


def test_sampling_cadence_and_no_counting_in_validation(tmp_path: Any) -> None:
    class Counting(DeadNeuronCallback):
        calls = 0

        def _measure(self, *args: Any) -> Any:
            Counting.calls += 1
            return super()._measure(*args)

    callback = Counting(sample_every_n_steps=3, window=2)
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
    assert Counting.calls == 4 * 2
    # a window of 2 samples from step 3 on: logged on every logging step since
    logged = [s for s, _ in tb.scalars(tmp_path / "tb" / "version_0")["gradwatch/dead_fraction/net.fc1"]]
    assert logged == list(range(3, 12))
    assert no_probe_left(model)
    trainer.predict(model, DataLoader(model.data.tensors[0], batch_size=32))
    trainer.validate(model, model.val_dataloader())
    assert Counting.calls == 4 * 2


def test_every_micro_batch_of_a_sampled_step_counts(tmp_path: Any) -> None:
    net = Net("functional")
    kill(net.fc1, 0.25)
    callback = DeadNeuronCallback(sample_every_n_steps=2, window=4)
    fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=4, accumulate_grad_batches=2)
    # optimizer steps 0 and 2 are sampled, two micro-batches each: a window of 4 batches at step 2, judged once per
    # optimizer step (after its last micro-batch)
    assert [(s, v) for s, v in tb.scalars(tmp_path / "tb" / "version_0")["gradwatch/dead_fraction/net.fc1"]] == [
        (2, 0.25),
        (3, 0.25),
    ]


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
    trainer = fit(tmp_path, Classifier(net, lr=0.0), [callback], max_steps=3)  # 3 samples: one short of a window
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"][callback.state_key]
    assert state["samples"] == 3 and state["layers"] == ["net.fc1", "net.fc2", "net.head"]
    assert (state["last_alive"][:64] == -1).sum().item() == 32 and state["last_seen"].tolist() == [2.0, 2.0, -1.0]

    resumed = DeadNeuronCallback(sample_every_n_steps=1, window=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=5))
    trainer.fit(Classifier(net, lr=0.0), ckpt_path=tmp_path / "a.ckpt")
    # the window begun before the checkpoint fills after it: 4 samples at step 3
    assert [s for s, _ in tb.scalars(tmp_path / "b" / "tb" / "version_0")["gradwatch/dead_fraction/net.fc1"]] == [3, 4]
    # the first run judged its 3 samples when it ended (a run shorter than a window); the condition came back active
    assert [a.step for a in resumed.alerts] == [3]


def test_ddp_unit_alive_on_one_rank_only_is_alive(tmp_path: Any) -> None:
    rank0, rank1 = run_ddp_script("ddp_activations.py", tmp_path)
    # units: 0 alive on rank 1's data only, 1 and 2 dead everywhere, 3 alive everywhere -> 2 of 4 dead
    assert rank0["dead_alerts"] == rank1["dead_alerts"]
    assert [(a["name"], a["value"]) for a in rank0["dead_alerts"]] == [("net.0", 0.5)]
    assert rank0["local_dead_fraction"] == 0.75  # what rank 0 alone would have concluded
    # saturation counts are summed: tanh after net.2 saturates on rank 1's data only (1 unit of 4) -> about 1/8
    assert rank0["saturation_alerts"] == rank1["saturation_alerts"]
    [alert] = rank0["saturation_alerts"]
    assert alert["name"] == "net.2" and 0.1 < alert["value"] <= 0.125
    assert rank0["local_saturated"] == 0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"sample_every_n_steps": 0}, "sample_every_n_steps"),
        ({"sample_every_n_steps": 2.0}, "sample_every_n_steps"),
        ({"window": -2}, "window"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        DeadNeuronCallback(**kwargs)
