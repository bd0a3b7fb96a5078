"""DeadNeuronCallback and SaturationCallback on a model under torch.compile: the sampled batches are run again,
eagerly, and their verdicts agree with the same run uncompiled; the compiled graph gets no hook, no graph break and
no recompilation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradwatch import DeadNeuronCallback, GradientGeometry, GradWatch, SaturationCallback
from tests import tensorboard_events as tb
from tests.activation_models import Net, kill, no_probe_left
from tests.models import Classifier, mlp, trainer_kwargs


class Quiet(Classifier):
    """Logs nothing in training_step: Lightning compiles training_step too, where dynamo cannot trace self.log."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def faulty_net(fault: str) -> nn.Module:
    torch.manual_seed(0)
    if fault == "dead":  # 95% of fc1's units never fire; fc2 is healthy
        net = Net("functional")
        kill(net.fc1, 0.95)
        return net
    return Net("functional", act="tanh", gain=40.0)  # both tanh layers pinned at +-1


def model(fault: str, how: str) -> pl.LightningModule:
    net = faulty_net(fault)
    if how == "submodule":
        return Quiet(torch.compile(net, backend="eager"), lr=0.01)
    module = Quiet(net, lr=0.01)
    return torch.compile(module, backend="eager") if how == "lightning_module" else module


def callback(fault: str) -> DeadNeuronCallback | SaturationCallback:
    return (
        DeadNeuronCallback(sample_every_n_steps=2, window=3)
        if fault == "dead"
        else SaturationCallback(sample_every_n_steps=2, window=3)
    )


def fit(
    tmp_path: Path, lightning_module: Any, callbacks: list[Any], max_steps: int = 16
) -> tuple[pl.Trainer, dict[str, Any]]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_steps=max_steps))
    trainer.fit(lightning_module)
    counted = {"graphs": int(counters["stats"]["unique_graphs"]), "breaks": sum(counters["graph_break"].values())}
    return trainer, counted


def verdicts(alerts: list[Any]) -> set[tuple[str, str, str]]:
    return {(a.kind, a.name, a.severity) for a in alerts}


@pytest.mark.parametrize("fault", ["dead", "saturated"])
@pytest.mark.parametrize("how", ["submodule", "lightning_module"])
def test_compiled_verdicts_agree_with_the_uncompiled_run_and_the_graph_is_untouched(
    tmp_path: Path, fault: str, how: str, recwarn: pytest.WarningsRecorder
) -> None:
    plain = callback(fault)
    fit(tmp_path / "plain", model(fault, "none"), [plain])
    expected = verdicts(plain.alerts)
    assert expected and all(severity == "warning" for _, _, severity in expected)  # the fault is there to see

    _, bare = fit(tmp_path / "bare", model(fault, how), [])
    watched = callback(fault)
    lightning_module = model(fault, how)
    _, counted = fit(tmp_path / "compiled", lightning_module, [watched])
    assert verdicts(watched.alerts) == expected  # the same layers, kinds and severities
    assert counted == bare and counted["breaks"] == 0 and counted["graphs"] >= 1  # no break, no recompilation
    assert not any("is inactive" in str(w.message) for w in recwarn)
    assert no_probe_left(lightning_module)
    tags = tb.scalars(tmp_path / "compiled" / "tb" / "version_0")
    metric = "dead_fraction" if fault == "dead" else "saturation"
    # the model's own layer names (no torch.compile wrapper segment), sampled at steps 0, 2, ...
    assert {f"gradwatch/{metric}/net.fc1", f"gradwatch/{metric}/net.fc2"} <= set(tags)


def test_the_eager_pass_changes_nothing_in_the_run(tmp_path: Path) -> None:
    """The weights a compiled run reaches are the same with the eager pass and without (eval mode, no gradients:
    no dropout draw, no BatchNorm statistics, no gradient left behind), and the training flags are restored."""

    class WithDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net("functional")
            self.drop = nn.Dropout(0.3)
            self.bn = nn.BatchNorm1d(self.net.fc1.in_features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.drop(self.bn(x)))

    finals = []
    watching = [DeadNeuronCallback(sample_every_n_steps=1, window=2), SaturationCallback(1, window=2)]
    for callbacks in ([], watching):
        torch.manual_seed(0)
        module = Quiet(torch.compile(WithDropout(), backend="eager"), lr=0.05)
        fit(tmp_path / str(len(callbacks)), module, callbacks, max_steps=60)  # with BatchNorm: from step 50
        assert module.training and all(m.training for m in module.modules())
        finals.append({k: v.clone() for k, v in module.state_dict().items()})
    assert watching[0]._samples == 10  # steps 50 to 59 were run again
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], rtol=0, atol=0, msg=key)


def test_a_batch_the_default_forward_cannot_run_warns_once_and_the_run_goes_on(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    class DictModel(Quiet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch["x"]), batch["y"])

        def train_dataloader(self) -> Any:
            rows = [{"x": x, "y": y} for x, y in self.data]
            return DataLoader(rows, batch_size=self.batch_size)  # default collate: a dict of batched tensors

    dead = DeadNeuronCallback(sample_every_n_steps=2, window=3)
    trainer, _ = fit(tmp_path, DictModel(torch.compile(faulty_net("dead"), backend="eager")), [dead])
    assert trainer.global_step == 16
    failed = [str(w.message) for w in recwarn if "could not run the model" in str(w.message)]
    assert len(failed) == 1 and "forward_fn" in failed[0]

    # with forward_fn the dict batch is run, and the dead layer is found
    dead = DeadNeuronCallback(sample_every_n_steps=2, window=3, forward_fn=lambda module, batch: module(batch["x"]))
    fit(tmp_path / "fn", DictModel(torch.compile(faulty_net("dead"), backend="eager")), [dead])
    assert ("dead_neurons", "net.fc1", "warning") in verdicts(dead.alerts)


def test_a_forward_fn_that_fails_on_the_batch_never_stops_the_run(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """Whatever the eager pass raises (an index past a positional table: a sequence one token longer than the model
    takes), it is the callback's pass, not the run's: one warning, and training goes on. It crashed the fit."""

    def too_long(module: Any, batch: Any) -> Any:
        table = torch.zeros(4)
        return table[batch[0].shape[1]]  # IndexError, as an embedding lookup past its table raises

    trainer, _ = fit(tmp_path, model("dead", "submodule"), [GradWatch(forward_fn=too_long)])
    assert trainer.global_step == 16
    failed = sorted(str(w.message).split(" ")[0] for w in recwarn if "could not run the model" in str(w.message))
    assert failed == ["DeadNeuronCallback", "SaturationCallback", "SetupCheck"], failed


def test_forward_fn_must_be_callable() -> None:
    with pytest.raises(ValueError, match="`forward_fn`"):
        DeadNeuronCallback(forward_fn="module(batch)")  # type: ignore[arg-type]


def test_gradient_geometry_probes_a_compiled_model_without_touching_its_graph(tmp_path: Path) -> None:
    geometry = GradientGeometry(every_n_steps=5, histograms=False)
    _, bare = fit(tmp_path / "bare", Quiet(torch.compile(mlp(3, width=32), backend="eager")), [])
    _, counted = fit(tmp_path / "geometry", Quiet(torch.compile(mlp(3, width=32), backend="eager")), [geometry])
    assert counted == bare and counted["breaks"] == 0
    tags = tb.scalars(tmp_path / "geometry" / "tb" / "version_0")
    assert any(t.startswith("gradwatch/gradient_coherence/") for t in tags)


def test_before_torch_2_6_the_compiled_model_is_left_alone_and_the_callbacks_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """torch 2.4-2.5 have no torch.compiler.set_stance: the eager pass cannot be run, so the activation callbacks
    stay off under torch.compile (as before) and say why, and the graph is still untouched."""
    import lightning_gradwatch.activations._callback as activations

    monkeypatch.setattr(activations, "CAN_RUN_EAGERLY", False)
    dead = callback("dead")
    _, bare = fit(tmp_path / "bare", model("dead", "submodule"), [])
    _, counted = fit(tmp_path / "old", model("dead", "submodule"), [dead])
    assert counted == bare and dead.alerts == []
    [warned] = [str(w.message) for w in recwarn if "is inactive in this run" in str(w.message)]
    assert "torch.compiler.set_stance (torch >= 2.6)" in warned
