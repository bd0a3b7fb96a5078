"""GradientNormLogger in real Trainer fits on CPU, with the TensorBoard event files read back."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradwatch import Alert, GradientNormLogger
from lightning_gradwatch._precision import grad_scaler, grads_are_scaled
from tests import failure_models as fm
from tests import tensorboard_events as tb
from tests.distributed import run_ddp_script
from tests.models import (
    Classifier,
    TinyLSTM,
    TinyTransformer,
    classification_data,
    image_data,
    mlp,
    resnet,
    trainer_kwargs,
)


class ReferenceNorms(Callback):
    """Records the true, unscaled global 2-norm of the gradients on every optimizer step."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = torch.cat([p.grad.flatten().double() for p in pl_module.parameters() if p.grad is not None])
        if grads_are_scaled(trainer, optimizer):
            grads = grads / grad_scaler(trainer).get_scale()  # type: ignore[union-attr]
        self.by_step[trainer.fit_loop.epoch_loop._batches_that_stepped] = float(torch.linalg.vector_norm(grads))


def fit(tmp_path: Any, model: pl.LightningModule, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model)
    return trainer


def logdir(tmp_path: Any) -> str:
    return str(tmp_path / "tb" / "version_0")


def test_logs_global_and_per_layer_norms_matching_the_true_gradients(tmp_path: Any) -> None:
    reference = ReferenceNorms()
    fit(tmp_path, Classifier(mlp(2)), [GradientNormLogger(log_every_n_steps=3), reference], max_steps=12)
    events = tb.scalars(logdir(tmp_path))
    global_norms = dict(events["gradwatch/global/grad_norm"])
    assert sorted(global_norms) == [2, 5, 8, 11]  # every 3rd optimizer step, nothing in between
    for step, value in global_norms.items():
        assert value == pytest.approx(reference.by_step[step], rel=1e-5)
    layers = {t.removeprefix("gradwatch/grad_norm/") for t in events if t.startswith("gradwatch/grad_norm/")}
    assert layers == {"net.0", "net.2", "net.4"}  # grouped by module: weight and bias together
    ratios = {t for t in events if t.startswith("gradwatch/grad_to_weight/")}
    assert len(ratios) == 3
    # the layer norms combine to the global norm
    per_layer_at_2 = [dict(events[f"gradwatch/grad_norm/{name}"])[2] for name in layers]
    assert math.sqrt(sum(v * v for v in per_layer_at_2)) == pytest.approx(global_norms[2], rel=1e-5)


def test_follows_the_trainer_logging_cadence_and_groups_per_parameter(tmp_path: Any) -> None:
    fit(
        tmp_path,
        Classifier(mlp(1)),
        [GradientNormLogger(group_by="parameter", norm_type="inf")],
        max_steps=10,
        log_every_n_steps=5,
    )
    events = tb.scalars(logdir(tmp_path))
    assert [s for s, _ in events["gradwatch/global/grad_norm"]] == [4, 9]
    assert {t for t in events if t.startswith("gradwatch/grad_norm/")} == {
        "gradwatch/grad_norm/net.0.weight",
        "gradwatch/grad_norm/net.0.bias",
        "gradwatch/grad_norm/net.2.weight",
        "gradwatch/grad_norm/net.2.bias",
    }


def test_custom_scalars_layout_written_once_with_grouped_charts(tmp_path: Any) -> None:
    # two instances in one Trainer: distinct state keys, one merged layout
    first, second = GradientNormLogger(), GradientNormLogger(norm_type=1, log_grad_to_weight=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[first, second], max_steps=2))
    trainer.fit(Classifier(mlp(1)))
    found = tb.layouts(logdir(tmp_path))
    assert len(found) == 1
    charts = found[0]["gradwatch: gradients"]
    assert charts["global gradient norm"] == [r"^gradwatch/global/grad_norm"]
    assert set(charts) == {"global gradient norm", "gradient norm: net: 0 … 2", "grad/weight ratio: net: 0 … 2"}


@pytest.mark.parametrize("depth", [3, 20])
def test_each_logged_layer_is_drawn_in_exactly_one_chart_of_at_most_ten_lines(tmp_path: Any, depth: int) -> None:
    # a model held in one attribute (self.net) with 21 layers: three charts of seven, not one of 21 lines
    fit(tmp_path, Classifier(mlp(depth)), [GradientNormLogger()], max_steps=2)
    [layout] = tb.layouts(logdir(tmp_path))
    charts = layout["gradwatch: gradients"]
    tags = set(tb.scalars(logdir(tmp_path)))
    for metric, title in (("grad_norm", "gradient norm: "), ("grad_to_weight", "grad/weight ratio: ")):
        regexes = {t: re.compile(r) for t, [r] in charts.items() if t.startswith(title)}
        assert len(regexes) == (1 if depth == 3 else 3)
        logged = {t for t in tags if t.startswith(f"gradwatch/{metric}/")}
        assert len(logged) == depth + 1
        for tag in logged:
            assert sum(bool(r.search(tag)) for r in regexes.values()) == 1, tag
        for regex in regexes.values():
            assert 1 <= sum(bool(regex.search(t)) for t in tags) <= 10
    if depth == 20:
        assert "gradient norm: net: 0 … 12" in charts and "gradient norm: net: 28 … 40" in charts


def test_histograms_at_their_own_cadence(tmp_path: Any) -> None:
    fit(
        tmp_path,
        Classifier(mlp(1)),
        [GradientNormLogger(log_every_n_steps=100, histogram_every_n_steps=4)],
        max_steps=8,
    )
    assert sorted(tb.histograms(logdir(tmp_path))) == ["gradwatch/grad_hist/net.0", "gradwatch/grad_hist/net.2"]
    assert "gradwatch/global/grad_norm" not in tb.scalars(logdir(tmp_path))


@pytest.mark.parametrize(
    "make_model",
    [
        pytest.param(lambda: Classifier(mlp(4)), id="relu-mlp-sgd"),
        pytest.param(lambda: Classifier(mlp(6, act=nn.GELU), lr=1e-3, optimizer="adam"), id="gelu-mlp-adam"),
        pytest.param(lambda: Classifier(mlp(4, act=nn.Tanh)), id="tanh-mlp"),
        pytest.param(lambda: Classifier(resnet(), data=image_data()), id="resnet-bn"),
        pytest.param(
            lambda: Classifier(TinyTransformer(), data=classification_data(seq_len=8), lr=1e-3, optimizer="adam"),
            id="transformer",
        ),
        pytest.param(
            lambda: Classifier(TinyLSTM(), data=classification_data(seq_len=8), lr=1e-3, optimizer="adam"), id="lstm"
        ),
    ],
)
def test_healthy_models_raise_no_alert(tmp_path: Any, make_model: Any, gradwatch_log: Any) -> None:
    callback = GradientNormLogger()
    fit(tmp_path, make_model(), [callback], max_steps=40)
    assert callback.alerts == []
    assert gradwatch_log.records == []


def test_deep_sigmoid_mlp_alerts_vanishing_once_naming_the_first_layer(tmp_path: Any, gradwatch_log: Any) -> None:
    callback = GradientNormLogger()
    fit(tmp_path, Classifier(mlp(20, act=nn.Sigmoid)), [callback], max_steps=10)
    assert [a.kind for a in callback.alerts] == ["vanishing_gradient"]  # once, though it persists every step
    alert = callback.alerts[0]
    assert isinstance(alert, Alert) and alert.name == "net.0" and alert.step == 0
    assert alert.value < alert.threshold == 1e-5
    assert "net.0" in alert.message and "residual" in alert.message
    assert len(gradwatch_log.records) == 1
    [(step, text)] = tb.texts(logdir(tmp_path))["gradwatch/alerts/vanishing_gradient"]
    assert step == 0 and "net.0" in text


def test_too_large_init_relu_net_alerts_exploding(tmp_path: Any) -> None:
    callback = GradientNormLogger()
    fit(tmp_path, Classifier(mlp(20, init_gain=3.0), lr=1e-4), [callback], max_steps=5)
    kinds = [a.kind for a in callback.alerts]
    assert kinds[0] == "exploding_gradient"
    alert = callback.alerts[0]
    assert alert.value > alert.threshold == 1e3 and alert.name.startswith("net.")
    assert "clip" in alert.message and "learning rate" in alert.message


def test_exploding_jump_against_history(tmp_path: Any) -> None:
    def spike(module: Classifier, step: int) -> None:
        if step == 12:
            for p in module.parameters():
                p.grad.mul_(50.0)

    callback = GradientNormLogger(exploding_threshold=None)
    fit(tmp_path, Classifier(mlp(2), hook=spike), [callback], max_steps=16)
    [alert] = callback.alerts
    assert alert.kind == "exploding_gradient" and alert.step == 12 and "median" in alert.message


class ManualOptimization(Classifier):
    def __init__(self) -> None:
        super().__init__(mlp(2))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_and_gradient_accumulation(tmp_path: Any) -> None:
    reference = ReferenceNorms()
    fit(tmp_path / "manual", ManualOptimization(), [GradientNormLogger(), reference], max_steps=6)
    events = tb.scalars(tmp_path / "manual" / "tb" / "version_0")
    assert [s for s, _ in events["gradwatch/global/grad_norm"]] == list(range(6))
    assert events["gradwatch/global/grad_norm"][3][1] == pytest.approx(reference.by_step[3], rel=1e-5)

    reference = ReferenceNorms()
    fit(
        tmp_path / "accum",
        Classifier(mlp(2)),
        [GradientNormLogger(), reference],
        max_steps=4,
        accumulate_grad_batches=3,
    )
    events = tb.scalars(tmp_path / "accum" / "tb" / "version_0")
    # once per optimizer step, of the accumulated gradient
    assert [s for s, _ in events["gradwatch/global/grad_norm"]] == [0, 1, 2, 3]
    for step, value in events["gradwatch/global/grad_norm"]:
        assert value == pytest.approx(reference.by_step[step], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam_fused"])
def test_fp16_grad_scaler_norms_are_unscaled_and_overflow_steps_skipped(tmp_path: Any, optimizer: str) -> None:
    reference = ReferenceNorms()
    callback = GradientNormLogger()
    # a huge initial scale makes the first steps overflow, as on CUDA with the default 65536
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model = Classifier(mlp(2), lr=1e-3 if optimizer == "adam_fused" else 0.05, optimizer=optimizer)
    fit(tmp_path, model, [callback, reference], max_steps=40, plugins=[plugin])
    assert scaler.get_scale() < 2.0**24  # overflow happened and was skipped
    logged = dict(tb.scalars(logdir(tmp_path))["gradwatch/global/grad_norm"])
    assert 0 not in logged  # the overflow step is not logged
    assert len(logged) >= 20
    for step, value in logged.items():
        assert math.isfinite(value)
        assert value == pytest.approx(reference.by_step[step], rel=1e-3)
    assert callback.alerts == []


def test_state_is_checkpointed_and_restored(tmp_path: Any) -> None:
    callback = GradientNormLogger(log_every_n_steps=1)
    trainer = fit(tmp_path, Classifier(mlp(20, act=nn.Sigmoid)), [callback], max_steps=6)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
    assert len(state["norm_history"][""]) == 6 and state["alerts"][0]["kind"] == "vanishing_gradient"

    resumed = GradientNormLogger(log_every_n_steps=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "resume", callbacks=[resumed], max_steps=9))
    trainer.fit(Classifier(mlp(20, act=nn.Sigmoid)), ckpt_path=path)
    assert len(resumed._history[""]) == 9
    # the condition persisted across the resume: restored, not alerted again
    assert [a.kind for a in resumed.alerts] == ["vanishing_gradient"]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"norm_type": 0.5}, "norm_type"),
        ({"norm_type": "fro"}, "norm_type"),
        ({"group_by": "layer"}, "group_by"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps"),
        ({"vanishing_threshold": -1e-7}, "vanishing_threshold"),
        ({"vanishing_ratio": 0}, "vanishing_ratio"),
        ({"exploding_threshold": float("nan")}, "exploding_threshold"),
        ({"exploding_factor": 1.0}, "exploding_factor"),
        ({"history_size": 2}, "history_size"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        GradientNormLogger(**kwargs)


def test_ddp_rank_zero_writes_and_ranks_agree(tmp_path: Any) -> None:
    rank0, rank1 = run_ddp_script("ddp_gradient_norm.py", tmp_path)
    # gradients are all-reduced before the hook, so both ranks see the same norms and make the same findings
    assert rank0["last_grad_norm"] == pytest.approx(rank1["last_grad_norm"])
    assert rank0["history"] == rank1["history"] and len(rank0["history"][""]) == 4
    assert [a["kind"] for a in rank0["alerts"]] == ["vanishing_gradient"] == [a["kind"] for a in rank1["alerts"]]
    events = tb.scalars(tmp_path / "tb" / "version_0")
    assert [s for s, _ in events["gradwatch/global/grad_norm"]] == [1, 3, 5, 7]
    assert len(list((tmp_path / "tb").glob("version_*"))) == 1


def test_fsdp2_sharded_norms_equal_full_gradient_norms(tmp_path: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for rank in run_ddp_script("fsdp2_norms.py", tmp_path, port):
        assert rank["groups"] == ["0", "2", "4"]
        assert rank["numels"] == [5 * 7 + 7, 7 * 3 + 3, 3 + 1]  # full sizes, not shard sizes
        for p in ("2", "inf", "1"):
            assert rank[f"sharded_{p}"] == pytest.approx(rank[f"full_{p}"], rel=1e-5)


@pytest.mark.parametrize("scenario", ["collapsed_cnn", "exploding_rnn"])
def test_the_cpu_host_tally_decides_as_the_device_tally(
    tmp_path: Path, decide_on_host: Callable[[bool], None], scenario: str
) -> None:
    """On a CPU the interval's peak and each layer's last non-zero step are folded as floats: the same alerts, at
    the same steps, with the same onsets as the device path (a blow-up at step 0, layers that stop)."""
    found = {}
    for host in (True, False):
        decide_on_host(host)
        logger = GradientNormLogger()
        fm.fit(getattr(fm, scenario)(seed=0), 60, [logger], tmp_path / str(host))
        found[host] = [(a.kind, a.name, a.step, a.onset, a.severity, round(a.value, 3)) for a in logger.alerts]
    assert found[True] == found[False]
    expected = {"collapsed_cnn": "stopped_layer", "exploding_rnn": "exploding_gradient"}[scenario]
    assert any(kind == expected for kind, *_ in found[True])
