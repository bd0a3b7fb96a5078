"""GradientGeometry in real fits: the papers' effects flagged, healthy models left alone, the run left untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradwatch import DeadNeuronCallback, GradientGeometry, GradientNormLogger, SaturationCallback
from lightning_gradwatch.geometry._probe import find_blocks, probe_geometry
from tests.distributed import run_ddp_script
from tests.geometry_models import BertLike, ResidualBlock, plain_mlp, residual_mlp, token_data
from tests.models import Classifier, TinyLSTM, TinyTransformer, classification_data, image_data, resnet, trainer_kwargs
from tests.tensorboard_events import histograms, layouts, scalars
from tests.test_benchmarks import run_script, table_rows
from tests.test_host_syncs import counted_fit


def fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model)
    return trainer


def kinds(callback: GradientGeometry) -> list[tuple[int, str]]:
    return [(a.step, a.kind) for a in callback.alerts]


# ------------------------------------------------------------------------------------------ the papers' effects
def test_deep_plain_relu_is_shattered_and_a_residual_mlp_of_the_same_depth_is_not(tmp_path: Path) -> None:
    results = {}
    for name, make in (("plain", plain_mlp), ("residual", residual_mlp)):
        torch.manual_seed(0)
        geometry = GradientGeometry(every_n_steps=5)
        fit(tmp_path / name, Classifier(make(24), lr=1e-3), [geometry], max_steps=6)
        coherence = scalars(tmp_path / name / "tb" / "version_0")["gradwatch/geometry/gradient_coherence"]
        results[name] = (kinds(geometry), [value for _, value in coherence])
    alerts, coherence = results["plain"]
    assert alerts == [(0, "shattered_gradient")] and max(coherence) < 0.4
    alerts, coherence = results["residual"]
    assert alerts == [] and min(coherence) > 0.6


def test_too_small_an_init_is_named_vanishing_before_the_gradient_norms_are(tmp_path: Path) -> None:
    torch.manual_seed(0)
    geometry, norms = GradientGeometry(every_n_steps=10), GradientNormLogger()
    model = Classifier(plain_mlp(24, act=nn.Tanh, init="gaussian", gain=0.7), lr=0.05)
    fit(tmp_path, model, [geometry, norms], max_steps=30)
    (alert,) = geometry.alerts
    assert (alert.step, alert.kind) == (0, "vanishing_jacobian") and alert.value < 1e-3
    assert alert.name.startswith("net.") and "breaks isometry" in alert.message and "Usual remedies" in alert.message
    # the gradient norms alone: the early layers' gradients are smaller than the median, not yet 1000x smaller
    assert [a for a in norms.alerts if a.kind == "vanishing_gradient"] == []


@pytest.mark.parametrize(
    ("init", "gain", "expected"), [("orthogonal", 1.0, []), ("gaussian", 3.0, ["exploding_jacobian"])]
)
def test_block_gains_near_one_for_orthogonal_tanh_and_exploding_for_a_large_init(
    tmp_path: Path, init: str, gain: float, expected: list[str]
) -> None:
    torch.manual_seed(0)
    geometry = GradientGeometry(every_n_steps=5, shattered_threshold=None)
    fit(tmp_path, Classifier(plain_mlp(24, act=nn.Tanh, init=init, gain=gain), lr=1e-3), [geometry], max_steps=1)
    assert [a.kind for a in geometry.alerts] == expected
    logged = scalars(tmp_path / "tb" / "version_0")
    gains = [v[0][1] for tag, v in logged.items() if tag.startswith("gradwatch/jacobian_gain/")]
    assert len(gains) == 23  # the 24 hidden stages less the first (16 -> 64 features), the head left out too
    if init == "orthogonal":
        assert 0.85 < min(gains) and max(gains) < 1.05
    else:
        assert min(gains) > 1.1


# ------------------------------------------------------------------------------------------ healthy models
def bert_forward(module: pl.LightningModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return module.net(batch["ids"], batch["mask"])


class TokenClassifier(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch["ids"], batch["mask"]), batch["label"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


HEALTHY: dict[str, Any] = {
    "relu-mlp-he": lambda: Classifier(plain_mlp(4), optimizer="adam", lr=1e-3),
    "resnet-bn": lambda: Classifier(resnet(), data=image_data(), optimizer="adam", lr=1e-3),
    "transformer": lambda: Classifier(
        TinyTransformer(layers=4), data=classification_data(seq_len=8), optimizer="adam", lr=1e-3
    ),
    "tanh-orthogonal": lambda: Classifier(plain_mlp(24, act=nn.Tanh, init="orthogonal"), optimizer="adam", lr=1e-3),
    "bert-like": lambda: TokenClassifier(BertLike(), data=token_data(), optimizer="adam", lr=1e-3),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_models_stay_silent_while_training(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    geometry = GradientGeometry(every_n_steps=10, forward_fn=bert_forward if name == "bert-like" else None)
    fit(tmp_path, HEALTHY[name](), [geometry], max_steps=41)
    assert geometry.alerts == []
    logged = scalars(tmp_path / "tb" / "version_0")
    probed = [step for step, _ in logged["gradwatch/geometry/gradient_coherence"]]
    # with BatchNorm the first probe waits for the running statistics eval mode uses (min(10, 50) steps)
    assert probed == ([10, 20, 30, 40] if name == "resnet-bn" else [0, 10, 20, 30, 40])
    assert any(tag.startswith("gradwatch/jacobian_gain/") for tag in logged)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_transformers_are_probed_and_healthy(name: str) -> None:
    transformers = pytest.importorskip("transformers")  # not a dependency: skipped where it is not installed
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=200, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128
        )
        model, layer = transformers.BertForSequenceClassification(config), "BertLayer"
    else:
        config = transformers.GPT2Config(vocab_size=200, n_embd=64, n_layer=6, n_head=4, n_positions=64)
        model, layer = transformers.GPT2LMHeadModel(config), "GPT2Block"
    ids = torch.randint(0, 200, (16, 24))
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    blocks = find_blocks(model)
    assert blocks is not None and blocks.rule == f"repeated {layer} blocks" and len(blocks.names) == 6
    # the token ids are not perturbed: the first block's input (the embedding output) is
    result = probe_geometry(
        model,
        blocks,
        lambda: model(input_ids=ids, attention_mask=mask),  # a ModelOutput: its .logits are probed
        radius=0.3,
        power_iterations=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(result.square) and result.coherence.min() > 0.9  # healthy at init: no shattering...
    assert 1e-3 < result.gain.prod() < 1e2 and 0.9 < result.gain.min() and result.gain.max() < 1.1  # ...near isometry
    assert not result.sigma_max.isnan().any()  # HF attention, on the math kernel, has a double backward
    assert model.training


# ------------------------------------------------------------------------------------------ the run untouched
class Snapshot(Callback):
    """Before and after GradientGeometry's on_train_batch_end: training flags, BatchNorm buffers, grads, RNG."""

    def __init__(self) -> None:
        self.states: list[Any] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.states.append(
            (
                [m.training for m in pl_module.modules()],
                [b.clone() for b in pl_module.buffers()],
                [p.grad.clone() for p in pl_module.parameters() if p.grad is not None],
                torch.get_rng_state(),
            )
        )


def test_probe_restores_training_flags_and_touches_no_statistics_grads_or_random_stream(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip
    net[5].eval()  # the user froze this BatchNorm: it must stay in eval mode
    before, after = Snapshot(), Snapshot()
    geometry = GradientGeometry(every_n_steps=1)
    fit(tmp_path, Classifier(net), [before, geometry, after], max_steps=3)
    probed = scalars(tmp_path / "tb" / "version_0")["gradwatch/geometry/probe_seconds"]
    assert not geometry._warned and [step for step, _ in probed] == [1, 2]  # BatchNorm: from step min(1, 50)
    for (flags0, buffers0, grads0, rng0), (flags1, buffers1, grads1, rng1) in zip(
        before.states, after.states, strict=True
    ):
        assert flags0 == flags1 and flags0.count(False) == 1
        assert all(torch.equal(a, b) for a, b in zip(buffers0, buffers1, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True)) and grads0
        assert torch.equal(rng0, rng1)


def test_no_host_read_except_one_transfer_on_probe_steps(tmp_path: Path) -> None:
    baseline = counted_fit(tmp_path / "none", [], "32-true", 40).per_step()
    counter = counted_fit(tmp_path / "with", [GradientGeometry(every_n_steps=10)], "32-true", 40)
    added = {step: n - baseline[step] for step, n in counter.per_step().items()}
    assert added == {step: int(step % 10 == 0) for step in range(40)}, counter.reads


def test_gradient_accumulation_probes_once_per_optimizer_step(tmp_path: Path) -> None:
    geometry = GradientGeometry(every_n_steps=2)
    fit(tmp_path, Classifier(plain_mlp(3)), [geometry], max_steps=4, accumulate_grad_batches=3)
    logged = scalars(tmp_path / "tb" / "version_0")["gradwatch/geometry/probe_seconds"]
    assert [step for step, _ in logged] == [0, 2]


def test_activation_callbacks_share_the_probe_and_see_the_same_tallies_with_it(tmp_path: Path) -> None:
    logged = {}
    for name, extra in (("alone", []), ("with_geometry", [GradientGeometry(every_n_steps=1)])):
        torch.manual_seed(0)
        callbacks = [
            DeadNeuronCallback(sample_every_n_steps=1, window=2),
            SaturationCallback(sample_every_n_steps=1, window=2),
        ]
        fit(tmp_path / name, Classifier(plain_mlp(3, act=nn.Tanh)), [*callbacks, *extra], max_steps=6)
        tags = scalars(tmp_path / name / "tb" / "version_0")
        logged[name] = {t: v for t, v in tags.items() if "/saturation/" in t or "/dead_fraction/" in t}
    assert logged["alone"] and logged["alone"] == logged["with_geometry"]  # the probe passes are not counted


def test_a_forward_fn_that_bypasses_the_blocks_warns(tmp_path: Path) -> None:
    geometry = GradientGeometry(
        every_n_steps=1, forward_fn=lambda module, batch: module.net[-1](batch[0].new_zeros(4, 64))
    )
    with pytest.warns(UserWarning, match="no gradient reached the blocks' inputs"):
        fit(tmp_path, Classifier(plain_mlp(3)), [geometry], max_steps=1)
    assert geometry.alerts == []


# ------------------------------------------------------------------------------------------ what is logged
def test_tensorboard_metrics_histograms_and_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fit(tmp_path, Classifier(plain_mlp(4)), [GradientGeometry(every_n_steps=2)], max_steps=3)
    logdir = tmp_path / "tb" / "version_0"
    tags = set(scalars(logdir))
    blocks = ["net.0", "net.2", "net.4", "net.6", "net.8"]
    assert {f"gradwatch/gradient_coherence/{b}" for b in blocks} <= tags
    # the first stage changes the width and the head the output: no isometry to keep there
    assert {t for t in tags if t.startswith("gradwatch/jacobian_gain/")} == {
        f"gradwatch/jacobian_gain/{b}" for b in ("net.2", "net.4", "net.6")
    }
    assert {f"gradwatch/jacobian_sigma_max/{b}" for b in ("net.2", "net.4", "net.6")} <= tags
    assert {"gradwatch/geometry/jacobian_gain_product", "gradwatch/geometry/probe_seconds"} <= tags
    assert sorted(histograms(logdir)) == [f"gradwatch/activations/{b}" for b in ("net.0", "net.2", "net.4", "net.6")]
    (layout,) = layouts(logdir)
    import re

    charts = layout["gradwatch: geometry"]
    for tag in tags:
        if tag.startswith("gradwatch/") and tag != "gradwatch/geometry/probe_seconds":
            assert any(re.search(rx, tag) for rxs in charts.values() for rx in rxs), tag


# ------------------------------------------------------------------------------------------ blocks
def test_blocks_are_found_by_the_documented_rules() -> None:
    assert find_blocks(plain_mlp(3)).names == ["0", "2", "4", "6"]  # type: ignore[union-attr]
    residual = find_blocks(residual_mlp(8))
    assert residual is not None and residual.names == ["0", "1", "2", "3", "4", "6"]  # stages: more than 4 blocks
    assert find_blocks(nn.Sequential(*[ResidualBlock(8) for _ in range(3)])).rule == "repeated ResidualBlock blocks"  # type: ignore[union-attr]
    transformer = find_blocks(TinyTransformer(layers=3))
    assert transformer is not None and transformer.names == [f"encoder.layers.{i}" for i in range(3)]
    bert = find_blocks(BertLike(layers=2))
    assert bert is not None and bert.names == ["layers.0", "layers.1"]
    conv = find_blocks(resnet())
    assert conv is not None and conv.names == ["0", "3", "4", "7"]  # the BatchNorm stays with its conv
    assert find_blocks(TinyLSTM()) is None
    named = find_blocks(plain_mlp(3), ["2", "4"])
    assert named is not None and named.rule == "the `blocks` argument"
    with pytest.raises(ValueError, match="`blocks` names modules the model does not have"):
        find_blocks(plain_mlp(3), ["net.9"])


def test_blocks_argument_and_no_blocks(tmp_path: Path) -> None:
    geometry = GradientGeometry(every_n_steps=1, blocks=["net.2", "net.4"])
    fit(tmp_path / "named", Classifier(plain_mlp(3)), [geometry], max_steps=1)
    tags = set(scalars(tmp_path / "named" / "tb" / "version_0"))
    assert {t for t in tags if "coherence/" in t} == {
        "gradwatch/gradient_coherence/net.2",
        "gradwatch/gradient_coherence/net.4",
    }
    with pytest.raises(ValueError, match="net.9"):
        fit(tmp_path / "bad", Classifier(plain_mlp(3)), [GradientGeometry(blocks=["net.9"])], max_steps=1)
    lstm = GradientGeometry(every_n_steps=1)
    with pytest.warns(UserWarning, match="no blocks were found"):
        fit(tmp_path / "lstm", Classifier(TinyLSTM(), data=classification_data(seq_len=4)), [lstm], max_steps=2)
    assert not any(t.startswith("gradwatch/") for t in scalars(tmp_path / "lstm" / "tb" / "version_0"))


def test_a_model_the_default_forward_cannot_call_warns_and_stops(tmp_path: Path) -> None:
    geometry = GradientGeometry(every_n_steps=1)
    with pytest.warns(UserWarning, match="forward_fn"):
        fit(tmp_path, TokenClassifier(BertLike(), data=token_data(64)), [geometry], max_steps=2)
    assert not geometry._active


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"probe_size": 1.5}, "probe_size"),
        ({"radius": 0}, "radius"),
        ({"radius": 2}, "radius"),
        ({"power_iterations": -1}, "power_iterations"),
        ({"blocks": "net.0"}, "blocks"),
        ({"forward_fn": 3}, "forward_fn"),
        ({"shattered_threshold": 1.0}, "shattered_threshold"),
        ({"vanishing_gain": 2.0}, "vanishing_gain"),
        ({"exploding_gain": 0.5}, "exploding_gain"),
        ({"histograms": "yes"}, "histograms"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientGeometry(**kwargs)


# ------------------------------------------------------------------------------------------ DDP
def test_ddp_every_rank_probes_and_reaches_the_same_averaged_result(tmp_path: Path) -> None:
    ranks = run_ddp_script("ddp_geometry.py", tmp_path)
    assert ranks[0]["reported"] == ranks[1]["reported"] and len(ranks[0]["reported"]) == 3
    assert ranks[0]["alerts"] == ranks[1]["alerts"] == ["shattered_gradient"]
    local = [r["local_coherence"] for r in ranks]
    assert local[0] != pytest.approx(local[1], abs=1e-3)  # each rank probed its own data...
    assert ranks[0]["reported"][-1][0] == pytest.approx(sum(local) / 2, abs=1e-5)  # ...and they were averaged


# ------------------------------------------------------------------------------------------ benchmark scripts
def test_benchmark_scripts_still_run(tmp_path: Path) -> None:
    out = run_script("geometry_overhead.py", "--models", "mlp", "--iters", "4", "--batch-size", "8", tmp_path=tmp_path)
    (row,) = table_rows(out).values()
    assert row[0].startswith("4 (stages") and row[-1].startswith("+")
    out = run_script("geometry_reproduction.py", "--parts", "2", tmp_path=tmp_path)
    rows = table_rows(out)
    assert float(rows["orthogonal, gain 1"][1]) < 1.1  # sigma_max / gain: isometric
