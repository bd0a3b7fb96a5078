"""GradientNoiseScale in real fits: against the brute-force truth from per-example gradients, under 32-bit and
fp16 with a GradScaler (fused optimizer included), under DDP (tests/scripts/ddp_noise_scale.py), its logging
cadence, TensorBoard layout, checkpointed state and its idle warning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradwatch import GradientNoiseScale
from lightning_gradwatch.functional import noise_scale_readout
from tests.distributed import run_ddp_script
from tests.models import Classifier, mlp, trainer_kwargs
from tests.noise_scale_reference import FixedPoint, estimator_spread, per_example_grads, true_terms
from tests.tensorboard_events import layouts, scalars

STEPS = 100
MICRO = 8
ACCUMULATE = 4
DECAY = 0.99
TAGS = ("gradwatch/noise_scale", "gradwatch/noise_scale/grad_sq_norm", "gradwatch/noise_scale/trace_sigma")


@pytest.fixture(scope="module")
def truth_and_tolerance() -> tuple[torch.Tensor, torch.Tensor]:
    flat = per_example_grads()
    truth = torch.tensor(true_terms(flat))
    spread = estimator_spread(flat, MICRO, ACCUMULATE, 1, "accumulation", STEPS, DECAY)
    return truth, 4 * spread.double()  # four standard deviations of the estimator itself


def fixed_point_fit(tmp_path: Path, **kwargs: Any) -> tuple[GradientNoiseScale, pl.Trainer]:
    fused = kwargs.pop("fused", False)
    callback = GradientNoiseScale(ema_decay=DECAY)
    model = FixedPoint(micro_batch=MICRO, samples_per_epoch=kwargs.pop("samples_per_epoch", 10**6))
    if fused:
        model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0, fused=True)  # type: ignore[method-assign]
    options = {"max_steps": STEPS, "accumulate_grad_batches": ACCUMULATE, "callbacks": [callback], **kwargs}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **options))
    trainer.fit(model)
    return callback, trainer


def test_accumulation_estimate_matches_brute_force(tmp_path: Path, truth_and_tolerance: Any) -> None:
    truth, tolerance = truth_and_tolerance
    callback, _ = fixed_point_fit(tmp_path)
    estimate = noise_scale_readout(callback._state).double()
    assert torch.all((estimate / truth - 1).abs() < tolerance), (estimate.tolist(), truth.tolist(), tolerance.tolist())
    logged = scalars(tmp_path / "tb" / "version_0")
    assert logged["gradwatch/noise_scale"][-1][1] == pytest.approx(float(estimate[2]), rel=1e-5)
    assert {v for _, v in logged["gradwatch/noise_scale/batch_size"]} == {MICRO * ACCUMULATE}


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_grad_scaler_gives_the_32_bit_estimate(tmp_path: Path, fused: bool) -> None:
    # the first micro-batch is measured with the loss scale in it; fused optimizers also see scaled final grads
    reference, _ = fixed_point_fit(tmp_path / "32")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    fp16, trainer = fixed_point_fit(
        tmp_path / "16", plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], fused=fused
    )
    assert trainer.scaler is scaler and float(scaler._scale) == 2.0**12  # no overflow: every step measured
    expected = noise_scale_readout(reference._state)
    assert torch.allclose(noise_scale_readout(fp16._state), expected, rtol=0.02)


def test_a_short_last_window_of_an_epoch_is_rescaled(tmp_path: Path) -> None:
    # six micro-batches per epoch with accumulate_grad_batches=4: windows of 4 and 2 micro-batches alternate; the
    # short one holds (1/4) * the sum of 2 micro-batch means and must be scaled up to their mean
    flat = per_example_grads()
    truth = torch.tensor(true_terms(flat))
    callback, _ = fixed_point_fit(tmp_path, samples_per_epoch=6 * MICRO, max_steps=STEPS)
    tolerance = 4 * estimator_spread(flat, MICRO, 2, 1, "accumulation", STEPS, DECAY).double()  # the noisier half
    estimate = noise_scale_readout(callback._state).double()
    assert torch.all((estimate / truth - 1).abs() < tolerance), (estimate.tolist(), truth.tolist(), tolerance.tolist())


def test_a_window_with_unequal_micro_batches_is_skipped(tmp_path: Path) -> None:
    # 45 examples per epoch in micro-batches of 8: sizes 8, 8, 8, 8 | 8, 5: every second window is skipped
    callback, _ = fixed_point_fit(tmp_path, samples_per_epoch=45, max_steps=10)
    assert callback._state[2].item() == pytest.approx(1 - DECAY**5)


def test_logs_on_logging_steps_only_with_its_charts(tmp_path: Path) -> None:
    callback = GradientNoiseScale()
    model = Classifier(mlp(), lr=0.05)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=20, log_every_n_steps=5, accumulate_grad_batches=2, callbacks=[callback])
    )
    trainer.fit(model)
    logged = scalars(tmp_path / "tb" / "version_0")
    loss_steps = [s for s, _ in logged["train_loss"]]
    assert loss_steps == [4, 9, 14, 19]
    for tag in (*TAGS, "gradwatch/noise_scale/batch_size"):
        assert [s for s, _ in logged[tag]] == loss_steps, tag
    assert all(v > 0 for _, v in logged["gradwatch/noise_scale/trace_sigma"])
    charts = layouts(tmp_path / "tb" / "version_0")[0]["gradwatch: noise scale"]
    assert sorted(charts.values()) == sorted(
        [
            ["^gradwatch/noise_scale$", "^gradwatch/noise_scale/batch_size$"],
            ["^gradwatch/noise_scale/grad_sq_norm$"],
            ["^gradwatch/noise_scale/trace_sigma$"],
        ]
    )


def test_ema_is_checkpointed_and_continues_on_resume(tmp_path: Path) -> None:
    callback = GradientNoiseScale(ema_decay=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(tmp_path, max_steps=6, accumulate_grad_batches=2, enable_checkpointing=True)
    pl.Trainer(**{**kwargs, "callbacks": [callback, checkpoint]}).fit(FixedPoint())
    saved = callback._state.tolist()
    assert saved[2] == pytest.approx(1 - 0.5**6)  # six measurements folded in

    resumed = GradientNoiseScale(ema_decay=0.5)
    kwargs["max_steps"] = 8
    trainer = pl.Trainer(**{**kwargs, "callbacks": [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")]})
    trainer.fit(FixedPoint(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed._state[2].item() == pytest.approx(1 - 0.5**8)  # continued from the saved average, not afresh


def test_idle_without_accumulation_or_ddp_says_so_once(tmp_path: Path) -> None:
    callback = GradientNoiseScale()
    with pytest.warns(UserWarning, match="needs two batch sizes") as record:
        for run in range(2):
            trainer = pl.Trainer(**trainer_kwargs(tmp_path / str(run), max_steps=4, callbacks=[callback]))
            trainer.fit(Classifier(mlp()))
    assert sum("GradientNoiseScale" in str(w.message) for w in record) == 1
    assert not [t for t in scalars(tmp_path / "0" / "tb" / "version_0") if t.startswith("gradwatch/noise_scale")]
    assert callback._state is None


def test_manual_optimization_is_not_supported(tmp_path: Path) -> None:
    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__(mlp())
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()

    with pytest.warns(UserWarning, match="automatic optimization only"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[GradientNoiseScale()])).fit(Manual())


@pytest.mark.parametrize(
    ("argument", "value"),
    [("source", "zero"), ("ema_decay", 1.0), ("ema_decay", -0.1), ("log_every_n_steps", 0), ("batch_size", 2.5)],
)
def test_rejects_bad_arguments(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=argument):
        GradientNoiseScale(**{argument: value})


def test_ddp_estimates_match_brute_force(tmp_path: Path) -> None:
    flat = per_example_grads()
    truth = torch.tensor(true_terms(flat))
    ranks = run_ddp_script("ddp_noise_scale.py", tmp_path, timeout=300)
    assert ranks[0]["runs"].keys() == ranks[1]["runs"].keys()
    for name, run in ranks[0]["runs"].items():
        assert run["state"] == ranks[1]["runs"][name]["state"], name  # the same average on every rank
        assert run["source"] == run["expected_source"], name
        spread = estimator_spread(
            flat, run["micro"], run["accumulate"], 2, run["source"], run["steps"], run["decay"]
        ).double()
        estimate = torch.tensor(run["estimate"], dtype=torch.float64)
        assert torch.all((estimate / truth - 1).abs() < 4 * spread), (name, estimate.tolist(), truth.tolist())
    assert not ranks[0]["warnings"], ranks[0]["warnings"]


def test_no_warning_when_it_can_measure(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*GradientNoiseScale.*")
        fixed_point_fit(tmp_path, max_steps=2)
