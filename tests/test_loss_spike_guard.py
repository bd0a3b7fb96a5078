"""LossSpikeGuard in real fits: a spike is found, recorded, skipped or rolled back; no sync of its own beside
NaNGuard; every DDP rank decides alike; the recorded batches are skipped on resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from lightning_gradwatch import LossSpikeGuard, NaNGuard
from lightning_gradwatch.functional.spikes import is_spike, robust_zscore, robust_zscore_of_floats
from lightning_gradwatch.guards._loss_window import resized_window
from lightning_gradwatch.testing import HostReadCounter
from tests.distributed import run_ddp_script
from tests.models import Classifier, classification_data, mlp, trainer_kwargs
from tests.test_nan_guard import Snapshots, same

SPIKE = 70


class Spiking(Classifier):
    """A classifier whose loss at ``spike_steps`` is multiplied by ``factor`` (a bad batch's loss)."""

    def __init__(self, spike_steps: tuple[int, ...] = (SPIKE,), factor: float = 50.0, **kw: Any) -> None:
        super().__init__(mlp(2), lr=1e-3, optimizer="adam", **kw)
        self.spike_steps, self.factor = set(spike_steps), factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss * self.factor if self.global_step in self.spike_steps else loss


def fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Any], **kw: Any) -> pl.Trainer:
    kwargs = {"max_steps": 90, "log_every_n_steps": 10, **kw}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model)
    return trainer


def test_robust_zscore_ignores_unfilled_slots_and_outliers() -> None:
    window = torch.tensor([1.0, 1.1, 0.9, 1.0, 100.0, 0.0, 0.0, 0.0])
    z, median, sigma = robust_zscore(window, torch.tensor(5), torch.tensor(2.0))
    assert median.item() == pytest.approx(1.0) and sigma.item() == pytest.approx(1.4826 * 0.1, rel=1e-4)
    assert z.item() == pytest.approx(1.0 / (1.4826 * 0.1), rel=1e-4)  # the 100 did not widen the spread
    assert robust_zscore(window, torch.tensor(0), torch.tensor(5.0))[0].item() == 0.0


@pytest.mark.parametrize("filled", [0, 1, 2, 5, 8])
def test_robust_zscore_of_floats_is_the_same_definition(filled: int) -> None:
    window = torch.tensor([1.0, 1.1, 0.9, 1.0, 100.0, 1.3, 1.2, 3.0])
    for value in (0.5, 2.0, 1e4):
        expected = [t.item() for t in robust_zscore(window, torch.tensor(filled), torch.tensor(value))]
        got = robust_zscore_of_floats(window.tolist()[:filled], value)
        assert got[0] == pytest.approx(expected[0], rel=1e-5)
        assert got[1:] == pytest.approx(expected[1:], rel=1e-5, nan_ok=True)  # an even count takes the lower median


@pytest.mark.parametrize("host", [True, False], ids=["host-path", "device-path"])
@pytest.mark.parametrize("with_guard", [False, True])
def test_a_spike_is_found_recorded_and_logged(
    tmp_path: Path, with_guard: bool, host: bool, decide_on_host: Callable[[bool], None]
) -> None:
    decide_on_host(host)
    guard = LossSpikeGuard()
    fit(tmp_path, Spiking(), [NaNGuard(), guard] if with_guard else [guard])
    assert isinstance(guard._window.losses, list) is host  # on a CPU the window is a list and decisions are on the host
    [spike] = guard.spikes
    assert spike["step"] == SPIKE and spike["batch_idx"] == SPIKE % 16 and spike["z"] > 6
    [alert] = guard.alerts
    assert alert.kind == "loss_spike" and alert.severity == "info" and alert.began == SPIKE
    # decided on the host, or riding on NaNGuard's read: found at the spike's step; alone in "log" mode on the
    # device, at the logging step
    assert alert.step == (SPIKE if with_guard or host else 79)
    recorded = json.loads((tmp_path / "tb" / "version_0" / "gradwatch_spikes.json").read_text())
    assert recorded["spikes"][0]["step"] == SPIKE


class PeekVerdict(pl.Callback):
    """Records the guard's z-score of every step."""

    def __init__(self, guard: LossSpikeGuard) -> None:
        self.guard = guard
        self.seen: list[float | None] = []

    def on_before_optimizer_step(self, *args: Any) -> None:
        verdict = self.guard._verdict
        self.seen.append(float(verdict[1]) if verdict is not None else None)


def test_the_host_window_matches_the_device_window(tmp_path: Path, decide_on_host: Callable[[bool], None]) -> None:
    """The same run on both paths: the same z-scores at every step and the same window in the checkpoint."""
    zs, windows = {}, {}
    for host in (True, False):
        decide_on_host(host)
        guard = LossSpikeGuard(action="skip", window=16, warmup_steps=10)
        peek = PeekVerdict(guard)
        torch.manual_seed(0)
        fit(tmp_path / str(host), Spiking(spike_steps=(30, 50)), [peek, guard])
        zs[host], windows[host] = peek.seen, guard._extra_state()["window"]
        assert [s["step"] for s in guard.spikes] == [30, 50]
    assert zs[True] == pytest.approx(zs[False], rel=1e-4, abs=1e-5)
    assert (
        torch.allclose(windows[True]["losses"], windows[False]["losses"]) and windows[True]["count"] == 88
    )  # 90 steps, 2 spikes left out


def test_repeated_spikes_are_one_episode_and_one_warning(tmp_path: Path) -> None:
    guard = LossSpikeGuard(action="skip")
    fit(tmp_path, Spiking(spike_steps=(60, 64, 68)), [guard])
    [alert] = guard.alerts  # one episode: alerted once, its record kept up to date
    assert alert.severity == "warning" and alert.step == 68 and alert.began == 60 and "3 spikes" in alert.message
    assert [s["step"] for s in guard.spikes] == [60, 64, 68]


def test_a_divergence_is_one_alert_with_its_count(tmp_path: Path) -> None:
    """Dense spikes (every other step for 40 steps) are one persistent condition: one alert, not one per spike."""
    guard = LossSpikeGuard()
    steps = tuple(range(50, 90, 2))
    fit(tmp_path, Spiking(spike_steps=steps), [guard])
    [alert] = guard.alerts
    assert alert.severity == "warning" and alert.began == 50 and alert.step == 88
    assert f"{len(steps)} spikes from step 50 to 88" in alert.message
    recorded = json.loads((tmp_path / "tb" / "version_0" / "gradwatch_spikes.json").read_text())
    assert [s["step"] for s in recorded["spikes"]] == [s["step"] for s in guard.spikes] == list(steps)


class Climbing(Spiking):
    """From step 50 the loss doubles every 12 steps: a level that never holds."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss * 2.0 ** ((self.global_step - 50) // 12 + 1) if self.global_step >= 50 else loss


def test_a_loss_that_keeps_climbing_is_one_warning(tmp_path: Path) -> None:
    guard = LossSpikeGuard()
    fit(tmp_path, Climbing(spike_steps=()), [guard])
    [alert] = guard.alerts  # level after level: not a level shift to accept quietly but one warning, kept up to date
    assert alert.severity == "warning" and "keeps climbing: 3 level shifts from step 59 to 83" in alert.message
    assert len(guard.spikes) == 31  # every spike still recorded


SHIFT = 60


class NewRegime(Classifier):
    """The data change at step ``SHIFT``: half the labels become noise, and the loss settles at a higher level."""

    def __init__(self) -> None:
        super().__init__(mlp(2), lr=1e-2, optimizer="adam")
        self.noise = torch.Generator().manual_seed(7)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step >= SHIFT:
            noisy = torch.rand(len(y), generator=self.noise) < 0.5
            y = torch.where(noisy, torch.randint(0, 4, y.shape, generator=self.noise), y)
        return F.cross_entropy(self(x), y)


@pytest.mark.parametrize("host", [True, False], ids=["host-path", "device-path"])
def test_a_lasting_change_of_level_is_taken_as_the_new_level(
    tmp_path: Path, host: bool, decide_on_host: Callable[[bool], None]
) -> None:
    decide_on_host(host)
    guard, snaps = LossSpikeGuard(action="skip", window=32, warmup_steps=20, level_shift_after=10), Snapshots()
    fit(tmp_path, NewRegime(), [NaNGuard(), guard, snaps], max_steps=120)
    shifts = [a for a in guard.alerts if "level shift" in a.message.lower()]
    assert len(shifts) == 1 and shifts[0].kind == "loss_spike" and shifts[0].severity == "info"
    assert len(guard.alerts) <= 2 and len(guard.spikes) < 20  # not a warning per step
    assert SHIFT <= shifts[0].step < SHIFT + 30
    # training goes on in the new regime: the updates land again
    assert not same(snaps.weights[110], snaps.weights[119])


class Memorized(Classifier):
    """Two fixed batches, the second a little harder: the loss goes to ~1e-5 and alternates 1.2e-5 / 3.4e-5
    (a healthy run). With ``bad_step``, that step's batch has every label wrong: a real spike."""

    def __init__(self, bad_step: int | None = None) -> None:
        data = classification_data(64)
        data.tensors[0][32:] *= 0.6
        super().__init__(mlp(2, width=64), data=data, lr=0.01, optimizer="adam")
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.bad_step:
            y = (y + 1) % 4
        return F.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32, shuffle=False)


@pytest.mark.parametrize("bad_step", [None, 280], ids=["healthy", "real-spike"])
def test_a_tiny_loss_is_not_a_spiking_loss(tmp_path: Path, bad_step: int | None) -> None:
    torch.manual_seed(0)
    guard = LossSpikeGuard(action="skip", window=32, warmup_steps=20)
    fit(tmp_path, Memorized(bad_step), [guard], max_steps=300, log_every_n_steps=50)
    assert [s["step"] for s in guard.spikes] == ([] if bad_step is None else [bad_step])
    assert len(guard.alerts) == (0 if bad_step is None else 1)


@pytest.mark.parametrize("host", [True, False], ids=["host-path", "device-path"])
def test_the_absolute_floor_is_the_same_on_both_paths(host: bool) -> None:
    """``min_delta`` in the float and the tensor math: a relative jump near zero is no spike, 0.3 -> 3 is."""
    window = [0.3 + 0.001 * i for i in range(20)]
    tiny = [1.2e-5 + 1e-8 * i for i in range(20)]
    for values, value, expected in ((window, 3.0, True), (tiny, 3.4e-5, False), (tiny, 3e-3, False)):
        if host:
            z, median, _ = robust_zscore_of_floats(values, value)
            got = is_spike(z, value, median, 6.0, 0.1)
        else:
            t = torch.tensor(values + [0.0] * 12)
            z_t, median_t, _ = robust_zscore(t, torch.tensor(len(values)), torch.tensor(value))
            z, got = float(z_t), bool(is_spike(z_t, torch.tensor(value), median_t, 6.0, 0.1))
        assert z > 6 and got is expected  # every one of them is far out by the z-score alone


@pytest.mark.parametrize("new_window", [8, 32])
def test_a_resume_with_another_window_keeps_the_loss_history(tmp_path: Path, new_window: int) -> None:
    first = LossSpikeGuard(window=16, warmup_steps=10)
    trainer = fit(tmp_path / "a", Spiking(spike_steps=()), [first], max_steps=40)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = LossSpikeGuard(window=new_window, warmup_steps=10)
    model = Spiking(spike_steps=(44,))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=50, log_every_n_steps=10))
    trainer.fit(model, ckpt_path=str(tmp_path / "a.ckpt"))
    assert [s["step"] for s in resumed.spikes] == [44]  # the window came along: no second warm-up
    saved = first._extra_state()["window"]
    total = int(saved["count"])
    losses, count = resized_window(saved["losses"], saved["count"], new_window)
    ring = saved["losses"].tolist()
    oldest_first = ring[total % 16 :] + ring[: total % 16]
    kept = min(16, new_window)
    start = total % new_window if total >= new_window else 0
    chronological = losses.tolist()[start:] + losses.tolist()[:start]
    assert int(count) == total and chronological[-kept:] == pytest.approx(oldest_first[-kept:])  # newest, in order


def test_skip_drops_the_update_exactly(tmp_path: Path) -> None:
    guard, snaps = LossSpikeGuard(action="skip"), Snapshots()
    fit(tmp_path, Spiking(), [guard, snaps])
    assert same(snaps.weights[SPIKE], snaps.weights[SPIKE + 1])  # the weights did not move
    before, after = snaps.optimizer[SPIKE]["state"], snaps.optimizer[SPIKE + 1]["state"]
    assert all(torch.equal(before[k]["exp_avg"], after[k]["exp_avg"]) for k in before)  # nor the Adam moments


def test_rollback_restores_the_snapshot(tmp_path: Path) -> None:
    guard, snaps = LossSpikeGuard(action="rollback", snapshot_every_n_steps=5), Snapshots()
    fit(tmp_path, Spiking(), [NaNGuard(), guard, snaps])
    assert same(snaps.weights[SPIKE + 1], snaps.weights[65])  # back to the snapshot of step 65
    assert "rolled back" in guard.alerts[0].message


def test_under_fp16_skip_happens_on_the_device(tmp_path: Path) -> None:
    guard, snaps = LossSpikeGuard(action="skip"), Snapshots()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    fit(tmp_path, Spiking(), [guard, snaps], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert same(snaps.weights[SPIKE], snaps.weights[SPIKE + 1])  # the GradScaler skipped the step
    assert [s["step"] for s in guard.spikes] == [SPIKE]  # recorded at the next logging step


def counted(tmp_path: Path, callbacks: list[Any]) -> dict[int, int]:
    counter = HostReadCounter()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[counter.callback(), *callbacks], max_steps=40))
    with counter:
        trainer.fit(Spiking(spike_steps=()))
    return {s: n for s, n in counter.per_step().items() if s not in counter.logging_steps}


@pytest.mark.parametrize(
    ("name", "make", "per_step"),
    [
        ("log, alone", lambda: [LossSpikeGuard(log_every_n_steps=10)], 0),
        ("skip, alone", lambda: [LossSpikeGuard(action="skip", log_every_n_steps=10)], 1),
        (
            "skip, beside NaNGuard",
            lambda: [NaNGuard(log_every_n_steps=10), LossSpikeGuard("skip", log_every_n_steps=10)],
            1,
        ),
    ],
)
def test_host_reads(tmp_path: Path, name: str, make: Any, per_step: int) -> None:
    baseline = counted(tmp_path / "none", [])
    quiet = counted(tmp_path / "with", make())
    assert {s: quiet[s] - baseline[s] for s in quiet} == dict.fromkeys(quiet, per_step), name


def test_the_recorded_batches_are_skipped_on_resume(tmp_path: Path) -> None:
    first = LossSpikeGuard()
    fit(tmp_path / "a", Spiking(), [first], max_steps=75)
    spikes = tmp_path / "a" / "tb" / "version_0" / "gradwatch_spikes.json"
    resumed, snaps = LossSpikeGuard(skip_batches=spikes), Snapshots()
    fit(tmp_path / "b", Spiking(spike_steps=()), [resumed, snaps], max_steps=75)
    assert resumed.skipped_batches == 1 and same(snaps.weights[SPIKE], snaps.weights[SPIKE + 1])


class BadBatch(Classifier):
    """A fixed data order (an ordinary DataLoader, not resumable mid-epoch) with one bad batch: data batch
    ``BAD`` (its inputs 30 times too large) spikes the loss wherever it comes."""

    def __init__(self) -> None:
        data = classification_data(512)
        data.tensors[0][BAD * 16 : (BAD + 1) * 16] *= 30.0
        super().__init__(mlp(2), data=data, lr=1e-2, optimizer="adam", batch_size=16)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16, shuffle=False)


BAD = 24


@pytest.mark.parametrize("host", [True, False], ids=["host-path", "device-path"])
def test_skip_batches_after_a_mid_epoch_resume_drops_the_spiking_batch(
    tmp_path: Path, host: bool, decide_on_host: Callable[[bool], None]
) -> None:
    """Resumed at step 16 of a 32-batch epoch, Lightning replays the epoch's data from its start while batch_idx goes
    on from 16: (epoch 0, batch 24) is then a clean batch, and the bad one comes at step 32 + 24. The fingerprint
    finds it there."""
    decide_on_host(host)
    first = LossSpikeGuard(action="skip", window=16, warmup_steps=10)
    every_16 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=16, save_top_k=-1)
    fit(tmp_path / "a", BadBatch(), [first, every_16], max_steps=32, enable_checkpointing=True)
    assert [(s["step"], s["batch_idx"]) for s in first.spikes] == [(BAD, BAD)] and "fingerprint" in first.spikes[0]
    spikes = tmp_path / "a" / "tb" / "version_0" / "gradwatch_spikes.json"
    resumed, snaps = LossSpikeGuard(action="skip", window=16, warmup_steps=10, skip_batches=spikes), Snapshots()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed, snaps], max_steps=64))
    trainer.fit(BadBatch(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=16.ckpt"))
    assert resumed.skipped_batches == 1 and resumed.spikes == []  # the bad batch dropped, no spike came back
    assert same(snaps.weights[32 + BAD], snaps.weights[32 + BAD + 1])  # where it really came
    assert not same(snaps.weights[BAD], snaps.weights[BAD + 1])  # the clean batch at (epoch 0, 24) was kept


def test_a_file_without_fingerprints_is_not_applied_by_position_in_a_replayed_epoch(tmp_path: Path) -> None:
    """An older gradwatch_spikes.json lists batches by position only: in the epoch a mid-epoch resume replays from
    its start, those positions name clean batches: warned, not dropped."""
    first = LossSpikeGuard(action="skip", window=16, warmup_steps=10)
    every_16 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=16, save_top_k=-1)
    fit(tmp_path / "a", BadBatch(), [first, every_16], max_steps=32, enable_checkpointing=True)
    older = tmp_path / "older.json"
    older.write_text(json.dumps({"spikes": [{k: v for k, v in s.items() if k != "fingerprint"} for s in first.spikes]}))
    resumed, snaps = LossSpikeGuard(action="skip", window=16, warmup_steps=10, skip_batches=older), Snapshots()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed, snaps], max_steps=40))
    with pytest.warns(UserWarning, match="resumed mid-epoch"):
        trainer.fit(BadBatch(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=16.ckpt"))
    assert resumed.skipped_batches == 0 and not same(snaps.weights[BAD], snaps.weights[BAD + 1])  # kept


def test_ddp_a_spike_on_one_rank_is_skipped_on_both(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("ddp_loss_spike.py", tmp_path)
    assert rank0["weights"] == rank1["weights"] and rank0["spikes"] == rank1["spikes"] == [SPIKE]
    assert rank0["moved_at_spike"] is False and rank1["moved_at_spike"] is False


def test_ddp_log_mode_records_a_one_rank_spike_alike_on_every_rank_and_in_the_file(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("ddp_loss_spike.py", tmp_path, "log")
    assert rank0["spikes"] == rank1["spikes"] == rank0["file"] == [SPIKE]
    assert rank0["moved_at_spike"] is True and rank1["moved_at_spike"] is True  # log: the update landed
    # rerun with that file: rank 1's batch at the spike, found by its fingerprint, is dropped on both ranks
    spikes = next((tmp_path / "tb").glob("version_*")) / "gradwatch_spikes.json"
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    rank0, rank1 = run_ddp_script("ddp_loss_spike.py", rerun, "log", str(spikes))
    assert rank0["skipped_batches"] == rank1["skipped_batches"] == 1 and rank0["spikes"] == rank1["spikes"] == []
    assert (
        rank0["moved_at_spike"] is False and rank1["moved_at_spike"] is False and rank0["weights"] == rank1["weights"]
    )


def test_bad_arguments() -> None:
    for kwargs, argument in (
        ({"action": "halt"}, "action"),
        ({"window": 2}, "window"),
        ({"skip_batches": 3}, "skip_batches"),
        ({"min_delta": 0}, "min_delta"),
        ({"level_shift_after": 2}, "level_shift_after"),
    ):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            LossSpikeGuard(**kwargs)
