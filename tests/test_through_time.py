"""GradientsThroughTime: the memory horizon of recurrent models, in real fits and against a linear recurrence."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientsThroughTime, HealthReport
from lightning_gradwatch.functional import decay_per_step, lag_sensitivity, memory_horizon, state_sensitivity
from tests.models import trainer_kwargs
from tests.recurrent_models import FirstToken
from tests.tensorboard_events import images, layouts, scalars


def linear_recurrence(a: float, reverse: bool = False) -> Any:
    """``h_t = a h_{t-1} + x_t`` (or run backwards in time): the sensitivity at lag ``k`` is exactly ``a**k``."""

    def run(x: Tensor) -> Tensor:
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        h, out = torch.zeros_like(x[:, 0]), [None] * x.shape[1]
        for t in steps:
            h = a * h + x[:, t]
            out[t] = h
        return torch.stack(out, 1)

    return run


# ------------------------------------------------------------------------------------------------ the math
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
def test_a_linear_recurrence_has_the_analytic_profile_horizon_and_decay(reverse: bool) -> None:
    x = torch.randn(4, 30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    profile = lag_sensitivity(linear_recurrence(0.7, reverse), x, reverse=reverse)
    expected = torch.tensor([0.7**k for k in range(30)], dtype=torch.float64)
    torch.testing.assert_close(profile.double(), expected, rtol=1e-5, atol=0)
    assert memory_horizon(profile, 1e-3) == math.ceil(math.log(1e-3) / math.log(0.7))  # 20: 0.7**20 < 1e-3
    assert decay_per_step(profile) == pytest.approx(0.7, rel=1e-5)
    assert memory_horizon(lag_sensitivity(linear_recurrence(0.99), x), 1e-3) == 30  # never below: the whole sequence


@pytest.mark.parametrize("a", [0.7, 1.3])
def test_the_state_jacobians_product_of_a_linear_recurrence_is_a_to_the_k(a: float) -> None:
    def step(x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        h = a * (torch.zeros_like(x[:, 0]) if h is None else h) + x[:, 0]
        return h[:, None], h

    x = torch.randn(4, 20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    profile = state_sensitivity(step, x)
    expected = torch.tensor([1.0] + [a ** (k - 1) for k in range(1, 20)], dtype=torch.float64)
    torch.testing.assert_close(profile.double(), expected, rtol=1e-5, atol=0)


def test_the_probe_touches_no_gradient_and_rejects_outputs_without_time() -> None:
    rnn = nn.RNN(3, 8, batch_first=True)
    x = torch.randn(2, 10, 3)
    lag_sensitivity(lambda z: rnn(z)[0], x)
    assert all(p.grad is None for p in rnn.parameters()) and not x.requires_grad
    with pytest.raises(ValueError, match="batch, time, hidden"):
        lag_sensitivity(lambda z: rnn(z)[0][:, -1], x)


# ------------------------------------------------------------------------------------------------ real fits
def fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Any], steps: int) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_steps=steps))
    trainer.fit(model)
    return trainer


def warnings_of(callback: GradientsThroughTime) -> list[tuple[int, str, str]]:
    return [(a.step, a.kind, a.name) for a in callback.alerts if a.severity == "warning"]


def test_a_vanilla_rnn_on_a_dependency_100_steps_back_is_named_with_its_horizon(tmp_path: Path) -> None:
    torch.manual_seed(0)
    watch = GradientsThroughTime()
    fit(tmp_path, FirstToken("rnn"), [watch, HealthReport(print_report=False)], steps=600)
    [alert] = [a for a in watch.alerts if a.kind == "vanishing_through_time"]
    assert (alert.step, alert.name, alert.severity) == (500, "rnn", "warning")
    assert alert.value < 50 and f"reaches back only {int(alert.value)} of 100 timesteps" in alert.message
    assert "gated cell" in alert.message  # the remedy
    horizon = scalars(tmp_path / "tb" / "version_0")["gradwatch/through_time/horizon/rnn"]
    assert [step for step, _ in horizon] == [0, 100, 200, 300, 400, 500]
    assert images(tmp_path / "tb" / "version_0")["gradwatch/through_time/profile"] == [0, 100, 200, 300, 400, 500]
    [layout] = layouts(tmp_path / "tb" / "version_0")
    assert "memory horizon (timesteps)" in str(layout)
    report = (tmp_path / "tb" / "version_0" / "gradwatch_report.md").read_text()
    assert "Vanishing gradients through time" in report and "memory horizon of `rnn` at step 500" in report
    assert (tmp_path / "tb" / "version_0" / "gradients_through_time.png").stat().st_size > 1000


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_an_lstm_or_gru_on_the_same_task_learns_it_and_stays_silent(tmp_path: Path, cell: str) -> None:
    torch.manual_seed(0)
    watch = GradientsThroughTime()
    model = FirstToken(cell)
    fit(tmp_path, model, [watch], steps=600)
    assert warnings_of(watch) == []
    horizon = [v for _, v in scalars(tmp_path / "tb" / "version_0")["gradwatch/through_time/horizon/rnn"]]
    assert horizon[-1] > horizon[0]  # it learns to reach further back


def test_a_recurrent_weight_past_spectral_radius_1_explodes_through_time(tmp_path: Path) -> None:
    torch.manual_seed(0)
    watch = GradientsThroughTime()
    fit(tmp_path, FirstToken("rnn", radius=2.0, lr=1e-4), [watch], steps=1)
    [alert] = watch.alerts
    assert (alert.step, alert.kind, alert.name) == (0, "exploding_through_time", "rnn") and alert.value > 10
    assert "clip gradients" in alert.message


@pytest.mark.parametrize(
    "options", [{"bidirectional": True}, {"num_layers": 2}, {"batch_first": False}, {"proj_size": 8}], ids=str
)
def test_bidirectional_stacked_time_first_and_projected_modules_are_measured(tmp_path: Path, options: dict) -> None:
    cell = "lstm" if "proj_size" in options else "gru"
    watch = GradientsThroughTime(every_n_steps=2)
    model = FirstToken(cell, length=20, **options)
    if "proj_size" in options:
        model.head = nn.Linear(8, 4)
    fit(tmp_path, model, [watch], steps=3)
    horizon = scalars(tmp_path / "tb" / "version_0")["gradwatch/through_time/horizon/rnn"]
    assert [step for step, _ in horizon] == [0, 2] and all(0 < v <= 20 for _, v in horizon)


class CellLoop(pl.LightningModule):
    """A recurrence written by hand: an ``nn.RNNCell`` applied in a Python loop."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.RNNCell(3, 16), nn.Linear(16, 2)

    def recur(self, x: Tensor) -> Tensor:
        h, out = x.new_zeros(x.shape[0], 16), []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            out.append(h)
        return torch.stack(out, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.recur(x)[:, -1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        x = torch.randn(64, 40, 3, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, (x[:, 0, 0] > 0).long()), batch_size=16)


def test_a_user_written_cell_loop_is_probed_through_the_function_it_names(tmp_path: Path) -> None:
    watch = GradientsThroughTime(every_n_steps=2, recurrences={"cell": lambda module, batch: (batch[0], module.recur)})
    fit(tmp_path, CellLoop(), [watch], steps=3)
    horizon = scalars(tmp_path / "tb" / "version_0")["gradwatch/through_time/horizon/cell"]
    assert [step for step, _ in horizon] == [0, 2] and all(0 < v < 40 for _, v in horizon)


def test_the_run_is_unchanged_by_the_probes(tmp_path: Path) -> None:
    weights = {}
    for probed in (False, True):
        model = FirstToken("lstm", length=30, dropout=0.0)
        fit(tmp_path / str(probed), model, [GradientsThroughTime(every_n_steps=3)] if probed else [], steps=7)
        weights[probed] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True], strict=True))


def test_a_model_without_recurrent_modules_leaves_it_idle_saying_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.models import Classifier, mlp

    watch = GradientsThroughTime(every_n_steps=1)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, Classifier(mlp(2)), [watch], steps=3)
    assert caplog.text.count("nothing to watch in this model (no nn.RNN, nn.LSTM or nn.GRU)") == 1
    assert watch.alerts == [] and "gradwatch/through_time/probe_seconds" not in scalars(tmp_path / "tb" / "version_0")


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("every_n_steps", 0),
        ("threshold", 1.0),
        ("short_fraction", 0.0),
        ("exploding_factor", 1.0),
        ("patience_steps", 0),
    ],
)
def test_bad_arguments_name_the_argument(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        GradientsThroughTime(**{argument: value})
    with pytest.raises(ValueError, match="`recurrences`"):
        GradientsThroughTime(recurrences={"cell": "not callable"})  # type: ignore[dict-item]


def test_a_resumed_run_keeps_its_streak_of_short_horizons(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = GradientsThroughTime()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=301, save_top_k=-1)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path / "a", callbacks=[first, checkpoint], max_steps=301, enable_checkpointing=True)
    )
    trainer.fit(FirstToken("rnn"))
    assert len(first.state.streaks["rnn"]) == 4 and first.alerts == []  # probes 0-300 were short
    resumed = GradientsThroughTime()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=600))
    trainer.fit(FirstToken("rnn"), ckpt_path=str(tmp_path / "ckpt" / "epoch=4-step=301.ckpt"))
    carried = resumed.state.streaks["rnn"]  # probes 0-300 from the checkpoint, then 400 and 500
    saved = [(step, horizon) for step, _, horizon in first.state.streaks["rnn"]]
    assert [(step, horizon) for step, _, horizon in carried][:4] == saved and [s for s, _, _ in carried[4:]] == [
        400,
        500,
    ]


def test_a_gru_learning_to_carry_the_first_step_is_not_exploding(tmp_path: Path) -> None:
    """Leaving its plateau, the GRU of tests/mistakes becomes 11x more sensitive to the first of 12 steps than to the
    last: what the task asks for, while its loss falls. (It was alerted as exploding through time.)"""
    from tests.mistakes import scenarios as sc

    scenario = sc.build("gru_plateau", broken=False)
    watch = GradientsThroughTime(every_n_steps=25)
    sc.fit(scenario, [watch], tmp_path)
    assert warnings_of(watch) == []
    assert watch.state.readings["net.gru"]["horizon"] == 12  # it reaches the first step


class LanguageModel(pl.LightningModule):
    """A 2-layer LSTM language model of a Markov chain: it needs one step of context, learns it, and is healthy."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(64, 32), nn.LSTM(32, 64, num_layers=2), nn.Linear(64, 64)

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        tokens = batch[0].t()  # time first, as the classic word-language-model example
        out, _ = self.lstm(self.embed(tokens[:-1]))
        return F.cross_entropy(self.head(out).flatten(0, 1), tokens[1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        from tests.mistakes.scenarios import markov_tokens

        return DataLoader(markov_tokens(2048, vocab=64, seq_len=36), batch_size=32, shuffle=True)


def test_a_healthy_lstm_language_model_stays_silent(tmp_path: Path) -> None:
    torch.manual_seed(0)
    watch = GradientsThroughTime()
    fit(tmp_path, LanguageModel(), [watch], steps=700)
    assert warnings_of(watch) == []
    assert watch.state.readings["lstm"]["length"] == 35


def test_a_compiled_model_is_probed_from_an_eager_pass_with_its_graph_untouched(tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    def run(name: str, compiled: bool, callbacks: list[Any]) -> dict[str, int]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = FirstToken("rnn", radius=2.0, lr=1e-4, length=30)
        fit(tmp_path / name, torch.compile(model, backend="eager") if compiled else model, callbacks, steps=3)
        return {"graphs": int(counters["stats"]["unique_graphs"]), "breaks": sum(counters["graph_break"].values())}

    plain, watched = GradientsThroughTime(every_n_steps=2), GradientsThroughTime(every_n_steps=2)
    run("plain", False, [plain])
    bare = run("bare", True, [])
    assert run("compiled", True, [watched]) == bare and bare["graphs"] >= 1  # no graph, no break added
    assert [(a.step, a.kind, a.name) for a in watched.alerts] == [(0, "exploding_through_time", "rnn")]
    assert [(a.step, a.kind, a.name) for a in plain.alerts] == [(0, "exploding_through_time", "rnn")]
    # the eager pass reads the inputs the embedding gives after the step, not before it: close, not equal
    assert watched.alerts[0].value == pytest.approx(plain.alerts[0].value, rel=0.25)
    steps = [s for s, _ in scalars(tmp_path / "compiled" / "tb" / "version_0")["gradwatch/through_time/horizon/rnn"]]
    assert steps == [0, 2]


def test_a_compiled_cell_loop_is_probed_through_its_function_alone(tmp_path: Path) -> None:
    """Only `recurrences` to probe (no nn.RNN module): under torch.compile there is nothing to capture, so the
    model is not run a second time (CellLoop has no forward(); the default pass would fail and stop the callback)."""
    model = CellLoop()
    model.cell = torch.compile(model.cell, backend="eager")  # type: ignore[assignment]
    watch = GradientsThroughTime(every_n_steps=2, recurrences={"cell": lambda module, batch: (batch[0], module.recur)})
    fit(tmp_path, model, [watch], steps=3)
    horizon = scalars(tmp_path / "tb" / "version_0")["gradwatch/through_time/horizon/cell"]
    assert [step for step, _ in horizon] == [0, 2]
