"""SetupCheck names the mistakes in training code and settings; each mistake beside its healthy twin, real fits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradWatch, SetupCheck
from lightning_gradwatch._loss_trace import LossHistory
from lightning_gradwatch.alerts import Alert
from lightning_gradwatch.diagnosis._setup_rules import learning_rate_verdict
from tests.models import IN_FEATURES, NUM_CLASSES, classification_data, trainer_kwargs

T, VOCAB, D = 16, 48, 48


def warnings_of(alerts: list[Alert]) -> list[str]:
    return [f"{a.kind}@{a.step}: {a.message[:120]}" for a in alerts if a.severity == "warning"]


class CausalLM(pl.LightningModule):
    """A 2-layer causal transformer on a copy task, its mask a ``-inf`` buffer."""

    def __init__(self, lr: float, optimizer: str = "adam") -> None:
        super().__init__()
        self.lr, self.optimizer_name = lr, optimizer
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, 4, 96, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, VOCAB)
        self.register_buffer("mask", torch.triu(torch.full((T, T), float("-inf")), 1))
        tokens = torch.randint(0, VOCAB, (2048, T), generator=torch.Generator().manual_seed(0))
        tokens[:, 1::2] = tokens[:, 0::2]  # every other token repeats the one before: learnable
        self.tokens = tokens

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        logits = self.head(self.encoder(self.embed(x) + self.pos, mask=self.mask, is_causal=True))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.tokens), batch_size=32)


class EncoderHead(pl.LightningModule):
    """An encoder and a head; ``mistake`` breaks it the way training code does."""

    def __init__(self, mistake: str = "") -> None:
        super().__init__()
        self.mistake = mistake
        self.encoder = nn.Sequential(nn.Linear(IN_FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, NUM_CLASSES)
        self.aux = nn.Linear(32, 2)  # used only by the twin that has a spare branch
        self.automatic_optimization = mistake not in ("no_zero_grad", "manual", "manual_accumulation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if self.mistake == "detach":
            h = h.detach()
        elif self.mistake == "no_grad":
            with torch.no_grad():
                h = self.encoder[2](self.encoder[1](self.encoder[0](x)))
        elif self.mistake == "dead_end":
            torch.tanh(self.aux(h))  # computed and never read, like a pooler a token classifier ignores
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss if self.mistake != "manual_accumulation" else loss / 4)
        if self.mistake != "manual_accumulation" or (batch_idx + 1) % 4 == 0:
            opt.step()
            if self.mistake != "no_zero_grad":
                opt.zero_grad()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.encoder.parameters() if self.mistake == "not_in_optimizer" else self.parameters()
        if self.mistake == "frozen_encoder":
            self.encoder.requires_grad_(False)
            params = self.head.parameters()
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(2048), batch_size=32, shuffle=True)


def fit(tmp_path: Path, model: pl.LightningModule, steps: int = 40, **kw: Any) -> GradWatch:
    watch = GradWatch()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_steps=steps, log_every_n_steps=50, **kw)).fit(model)
    return watch


def test_adam_at_100x_its_rate_is_named_within_the_first_steps_and_its_twin_is_silent(tmp_path: Path) -> None:
    broken = fit(tmp_path / "broken", CausalLM(lr=1e-1))
    [alert] = [a for a in broken.alerts if a.kind == "learning_rate"]
    assert alert.step == 9 and alert.severity == "warning" and "rose from" in alert.message
    assert "lower the learning rate" in alert.message
    healthy = fit(tmp_path / "healthy", CausalLM(lr=1e-3), steps=60)
    assert warnings_of(healthy.alerts) == []


def test_sgd_diverging_is_named_before_the_nan_and_the_nan_says_it_diverged(tmp_path: Path) -> None:
    broken = fit(tmp_path / "broken", CausalLM(lr=30.0, optimizer="sgd"), steps=60)
    kinds = [a.kind for a in broken.alerts if a.severity == "warning"]
    [lr] = [a for a in broken.alerts if a.kind == "learning_rate"]
    assert "diverged" in lr.message and kinds[0] == "learning_rate"
    nan = [a for a in broken.alerts if a.kind == "non_finite"]
    if nan:  # when the divergence reaches NaN, the guard says it diverged, first
        assert nan[0].cause == "divergence" and "diverged" in nan[0].message.split("It surfaced")[0]
        assert lr.step < nan[0].step
    healthy = fit(tmp_path / "healthy", CausalLM(lr=0.1, optimizer="sgd"), steps=60)
    assert warnings_of(healthy.alerts) == []


def test_a_head_left_out_of_the_optimizer_is_named_at_the_first_step(tmp_path: Path) -> None:
    broken = fit(tmp_path / "broken", EncoderHead("not_in_optimizer"))
    [alert] = [a for a in broken.alerts if a.kind == "not_in_optimizer"]
    assert alert.step == 0 and alert.name == "head" and "'head.weight'" in alert.message
    assert "'aux" not in alert.message  # no gradient: not reported as left out
    assert warnings_of(fit(tmp_path / "healthy", EncoderHead()).alerts) == []
    # frozen on purpose (requires_grad off, only the head in the optimizer) is not a mistake
    assert warnings_of(fit(tmp_path / "frozen", EncoderHead("frozen_encoder")).alerts) == []


@pytest.mark.parametrize("mistake", ["detach", "no_grad"])
def test_layers_cut_off_by_a_detach_or_no_grad_are_named(tmp_path: Path, mistake: str) -> None:
    watch = fit(tmp_path, EncoderHead(mistake))
    [alert] = [a for a in watch.alerts if a.kind == "no_gradient"]
    assert alert.step == 19 and alert.severity == "warning" and alert.name == "encoder.0"
    assert "'encoder.0.weight'" in alert.message and "'aux.weight'" in alert.message and "head" not in alert.name


def test_a_spare_branch_without_gradient_is_worth_knowing_not_a_warning(tmp_path: Path) -> None:
    watch = fit(tmp_path, EncoderHead())
    [alert] = [a for a in watch.alerts if a.kind == "no_gradient"]
    assert alert.severity == "info" and alert.name == "aux"
    assert warnings_of(watch.alerts) == []
    silenced = GradWatch()
    silenced.gradwatch_callbacks[1] = SetupCheck(ignore=["aux"])
    silenced.gradwatch_callbacks[1]._bundled = True
    pl.Trainer(**trainer_kwargs(tmp_path / "ignored", callbacks=[silenced], max_steps=40)).fit(EncoderHead())
    assert not [a for a in silenced.alerts if a.kind == "no_gradient"]


def test_a_layer_that_runs_but_feeds_nothing_that_learns_is_worth_knowing_not_a_warning(tmp_path: Path) -> None:
    """A dead end (BERT's pooler under a token classifier) runs in forward and gets no gradient, as a layer cut off
    by a detach does; but nothing that learns reads what it returns (it was a warning on a healthy BERT)."""
    watch = fit(tmp_path, EncoderHead("dead_end"))
    [alert] = [a for a in watch.alerts if a.kind == "no_gradient"]
    assert alert.severity == "info" and alert.name == "aux"
    assert "never reaches a layer that learns" in alert.message
    assert warnings_of(watch.alerts) == []


@pytest.mark.parametrize("how", ["submodules", "lightning_module"])
@pytest.mark.parametrize("mistake", ["detach", "no_grad", "dead_end"])
def test_under_torch_compile_the_dataflow_comes_from_an_eager_pass_and_the_graph_is_untouched(
    tmp_path: Path, mistake: str, how: str
) -> None:
    """The hooks that record the dataflow never fire inside a compiled graph: a layer cut off by a detach read as
    'never used in forward' (info) and the warning was lost. It is recorded from an eager pass of its own."""
    from torch._dynamo.utils import counters

    def run(name: str, callbacks: bool) -> tuple[set[tuple[str, str, str]], int]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model: Any = EncoderHead(mistake)
        if how == "lightning_module":
            model = torch.compile(model, backend="eager")
        elif mistake == "no_grad":  # its forward indexes the encoder: compile the encoder's layers
            for i in range(len(model.encoder)):
                model.encoder[i] = torch.compile(model.encoder[i], backend="eager")
        else:  # the parts a user compiles; the forward that joins them stays eager
            model.encoder, model.head = (torch.compile(m, backend="eager") for m in (model.encoder, model.head))
            model.aux = torch.compile(model.aux, backend="eager")
        if not callbacks:
            pl.Trainer(**trainer_kwargs(tmp_path / name, max_steps=40)).fit(model)
            return set(), int(counters["stats"]["unique_graphs"])
        watch = fit(tmp_path / name, model)
        found = {(a.kind, a.name, a.severity) for a in watch.alerts if a.kind == "no_gradient"}
        return found, int(counters["stats"]["unique_graphs"])

    plain = fit(tmp_path / "plain", EncoderHead(mistake))
    expected = {(a.kind, a.name, a.severity) for a in plain.alerts if a.kind == "no_gradient"}
    assert expected == (
        {("no_gradient", "aux", "info")} if mistake == "dead_end" else {("no_gradient", "encoder.0", "warning")}
    )
    found, graphs = run("compiled", True)
    assert found == expected
    assert graphs == run("bare", False)[1] >= 1  # no recompilation


def test_gradients_never_reset_in_manual_optimization_are_named_and_zeroing_twins_are_silent(
    tmp_path: Path,
) -> None:
    broken = fit(tmp_path / "broken", EncoderHead("no_zero_grad"))
    [alert] = [a for a in broken.alerts if a.kind == "gradients_not_reset"]
    assert alert.step == 1 and alert.severity == "warning" and "zero_grad" in alert.message
    assert warnings_of(fit(tmp_path / "healthy", EncoderHead("manual")).alerts) == []
    accumulating = fit(tmp_path / "accumulation", EncoderHead("manual_accumulation"), steps=20)
    assert not [a for a in accumulating.alerts if a.kind == "gradients_not_reset"]


def test_setup_check_rejects_bad_arguments_naming_them() -> None:
    with pytest.raises(ValueError, match="no_gradient_after_steps"):
        SetupCheck(no_gradient_after_steps=0)
    with pytest.raises(ValueError, match="ignore"):
        SetupCheck(ignore="aux")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="update_ratio_high"):
        SetupCheck(update_ratio_high=-1.0)


def _verdicts(losses: list[float], ratios: list[float]) -> dict[int, str]:
    """The learning-rate verdict at each step of a loss curve (the history as the trace keeps it, 16 first steps)."""
    found = {}
    for step in range(len(losses)):
        history = LossHistory(losses[: min(step + 1, 16)], losses[: step + 1], step)
        verdict = learning_rate_verdict(step, history, ratios, 0.1)
        if verdict is not None:
            found[step] = verdict.message
    return found


# measured first steps (tests/real_models: word_language_model tied, SGD lr 20, clip 0.25; tests/mistakes: Adam at
# 100x its rate on a causal LM)
TIED_LSTM = [4.36, 7.69, 6.99, 7.38, 6.01, 6.16, 6.20, 5.45, 4.92, 4.44, 4.16, 3.95, 3.62, 3.39, 3.47, 3.18, 2.89]
ADAM_100X = [4.30, 5.03, 7.84, 6.18, 6.19, 5.53, 4.84, 4.67, 4.58, 4.67, 4.66, 4.79, 4.51, 4.55, 4.36, 4.46, 4.14]


def test_a_first_jolt_that_is_coming_back_is_judged_again_at_step_15() -> None:
    """A high-rate recipe's first jolt (the loss jumps, then falls on every step) is not a rate far too high: it was
    a warning at step 9 on word_language_model's own recipe; a loss hovering above its start still is."""
    assert _verdicts(TIED_LSTM, [0.27]) == {}
    assert list(_verdicts(ADAM_100X, [0.3])) == [9]
    stalled = TIED_LSTM[:10] + [4.5, 4.6, 4.55, 4.6, 4.62, 4.58, 4.6]  # it fell until step 9, then stayed above
    [(step, message)] = _verdicts(stalled, [0.27]).items()
    assert step == 15 and "came down to 4.44 at step 9 and is still 4.6 at step 15" in message
