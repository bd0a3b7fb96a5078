"""AdaptiveClipping in real Trainer fits on CPU: spikes clipped, healthy runs untouched, fp16, resume, DDP."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradwatch import AdaptiveClipping, GradientNormLogger
from lightning_gradwatch._precision import grad_scaler, grads_are_scaled
from tests import tensorboard_events as tb
from tests.distributed import run_ddp_script
from tests.models import Classifier, mlp, trainer_kwargs

SPIKE_STEP = 40


class Spiky(Classifier):
    """A classifier whose batch at ``spike_step`` is an outlier: inputs scaled by ``factor``."""

    def __init__(self, spike_step: int | None = SPIKE_STEP, factor: float = 1000.0, **kwargs: Any) -> None:
        super().__init__(mlp(2), **kwargs)
        self.spike_step = spike_step
        self.factor = factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.spike_step:
            x = x * self.factor
        return F.cross_entropy(self(x), y)


class ManualSpiky(Spiky):
    """Manual optimization with gradient accumulation over 2 batches."""

    def __init__(self) -> None:
        super().__init__(spike_step=None)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        if self.global_step == SPIKE_STEP:  # both micro-batches of optimizer step 40
            x = x * 1000.0
        loss = F.cross_entropy(self(x), y) / 2
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()
        return loss


class Norms(Callback):
    """Records the unscaled global gradient norm at its place among the callbacks (before or after clipping)."""

    def __init__(self, repair: bool = False) -> None:
        self.by_step: dict[int, float] = {}
        self.repair = repair

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads])))
        if grads_are_scaled(trainer, optimizer):
            norm /= grad_scaler(trainer).get_scale()  # type: ignore[union-attr]
        self.by_step[trainer.global_step] = norm
        if self.repair:  # plays NaNGuard's part after the clipper: keep the run alive
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


def fit(tmp_path: Any, model: pl.LightningModule, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model)
    return trainer


def clipped_and_reported(pre: Norms, post: Norms, callback: Any, step: int = SPIKE_STEP) -> None:
    normal = statistics.median(pre.by_step[s] for s in range(step - 10, step))
    assert pre.by_step[step] > 100 * normal  # the outlier batch really is a spike...
    assert post.by_step[step] < 3 * normal  # ...and leaves the hook at the size of an ordinary step
    spikes = [a for a in callback.alerts if a.kind == "gradient_spike"]
    assert [a.began for a in spikes] == [step]  # the spike's step; found at the next logging step
    assert spikes[0].value == pytest.approx(pre.by_step[step], rel=1e-3)
    assert "1 gradient spike" in spikes[0].message


@pytest.mark.parametrize("mode", ["zscore", "percentile", "agc"])
def test_the_cpu_host_path_clips_exactly_as_the_device_path(
    tmp_path: Any, mode: str, decide_on_host: Callable[[bool], None]
) -> None:
    """On a CPU the statistics are floats and the decisions are taken on the host; switched off, the same run takes
    the tensor path a GPU takes. Same spikes, same warm-up cap, same clipping, same statistics, same alerts."""
    runs = {}
    for host in (True, False):
        decide_on_host(host)
        torch.manual_seed(0)
        pre, post = Norms(), Norms()
        callback = AdaptiveClipping(mode=mode, warmup_steps=10, log_every_n_steps=5)  # type: ignore[arg-type]
        fit(tmp_path / str(host), Spiky(spike_step=5, hook=_second_spike), [pre, callback, post], max_steps=50)
        assert callback._stats[0].on_host is host
        runs[host] = (pre, post, callback)
    (pre_h, post_h, host_cb), (pre_d, post_d, device_cb) = runs[True], runs[False]
    assert post_h.by_step[5] < pre_h.by_step[5] / 10 and post_h.by_step[SPIKE_STEP] < pre_h.by_step[SPIKE_STEP] / 10
    for step in pre_h.by_step:
        assert pre_h.by_step[step] == pytest.approx(pre_d.by_step[step], rel=1e-4)
        assert post_h.by_step[step] == pytest.approx(post_d.by_step[step], rel=1e-4)
    host_state, device_state = host_cb._stats[0].to_state(), device_cb._stats[0].to_state()
    for key, value in host_state.items():
        assert torch.allclose(value, device_state[key], rtol=1e-4), key
    assert [(a.kind, a.step, a.began, a.severity) for a in host_cb.alerts] == [
        (a.kind, a.step, a.began, a.severity) for a in device_cb.alerts
    ]
    assert len(host_cb.alerts) == 2


def _second_spike(module: Classifier, step: int) -> None:
    if step == SPIKE_STEP:
        for p in module.parameters():
            p.grad.mul_(1000.0)


@pytest.mark.parametrize("mode", ["zscore", "percentile", "agc"])
def test_injected_spike_is_clipped_logged_and_alerted(tmp_path: Any, mode: str) -> None:
    pre, post = Norms(), Norms()
    callback = AdaptiveClipping(mode=mode)  # type: ignore[arg-type]
    model = Spiky()
    fit(tmp_path, model, [pre, callback, post], max_steps=50, log_every_n_steps=5)
    clipped_and_reported(pre, post, callback)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = tb.scalars(tmp_path / "tb" / "version_0")
    for name in ("pre_clip_norm", "threshold", "coefficient", "clipped_fraction", "ema_mean", "ema_std", "spikes"):
        assert [s for s, _ in events[f"gradwatch/clip/{name}"]] == list(range(4, 50, 5))
    assert dict(events["gradwatch/clip/spikes"])[44] == 1.0  # the interval with the spike
    assert dict(events["gradwatch/clip/clipped_fraction"])[44] >= 0.2
    assert "gradwatch/alerts/gradient_spike" in tb.texts(tmp_path / "tb" / "version_0")
    [layout] = tb.layouts(tmp_path / "tb" / "version_0")
    assert "norm vs threshold" in layout["gradwatch: clipping"]


def test_spike_during_warmup_is_capped_and_does_not_disable_clipping_later(tmp_path: Any) -> None:
    def second_spike(module: Classifier, step: int) -> None:
        if step == SPIKE_STEP:
            for p in module.parameters():
                p.grad.mul_(1000.0)

    pre, post = Norms(), Norms()
    callback = AdaptiveClipping(log_every_n_steps=5)
    fit(tmp_path, Spiky(spike_step=6, hook=second_spike), [pre, callback, post], max_steps=50)
    early = statistics.fmean(pre.by_step[s] for s in range(6))
    assert pre.by_step[6] > 100 * early and post.by_step[6] == pytest.approx(10 * early, rel=1e-3)  # warm-up cap
    std = math.sqrt(float(callback._stats[0].var))
    assert std < float(callback._stats[0].mean)  # the variance was not blown up by the first spike...
    clipped_and_reported(pre, post, _SpikesAfter(callback, 6), SPIKE_STEP)  # ...so this one is clipped
    assert [a.began for a in callback.alerts] == [6, SPIKE_STEP]


class _SpikesAfter:
    """The alerts of ``callback`` after ``step`` (a view for :func:`clipped_and_reported`)."""

    def __init__(self, callback: AdaptiveClipping, step: int) -> None:
        self.alerts = [a for a in callback.alerts if a.began > step]


def _no_gradient_until_step_30(module: Classifier, step: int) -> None:
    if step < 30:  # a stalled phase (a collapsed network, a frozen warm-up): every gradient exactly zero
        for p in module.parameters():
            p.grad.zero_()


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_steps_without_gradient_do_not_teach_a_zero_threshold(
    tmp_path: Any, mode: str, host: bool, decide_on_host: Callable[[bool], None]
) -> None:
    """All-zero gradients say nothing about the gradient's scale: folded in, they drove the threshold to 0 and every
    later step, the recovery included, was clipped to nothing ("scaled by 0")."""
    decide_on_host(host)
    pre, post = Norms(), Norms()
    callback = AdaptiveClipping(mode=mode, warmup_steps=10, log_every_n_steps=5)  # type: ignore[arg-type]
    fit(tmp_path, Spiky(spike_step=None, hook=_no_gradient_until_step_30), [pre, callback, post], max_steps=45)
    assert all(pre.by_step[s] == 0.0 for s in range(30))
    for s in range(30, 45):  # the gradients that come back reach the optimizer
        assert pre.by_step[s] > 0 and post.by_step[s] > 0.2 * pre.by_step[s], s
    assert not [a for a in callback.alerts if a.kind == "gradient_spike" and a.severity == "warning"]


def test_without_clipping_the_same_spike_wrecks_the_run(tmp_path: Any) -> None:
    """The control for the test above: the spike is harmful, and clipping is what prevents the harm."""
    losses = {}
    for name, callbacks in (("none", []), ("clipped", [AdaptiveClipping()])):
        model = Spiky(lr=0.05)
        fit(tmp_path / name, model, callbacks, max_steps=60)
        x, y = model.data.tensors
        with torch.no_grad():
            losses[name] = (
                F.cross_entropy(model(x), y).item()
                if all(torch.isfinite(p).all() for p in model.parameters())
                else math.inf
            )
    assert losses["clipped"] < 1.0 < losses["none"]


def test_healthy_run_is_barely_touched(tmp_path: Any, gradwatch_log: Any) -> None:
    pre, post = Norms(), Norms()
    callback = AdaptiveClipping()
    fit(tmp_path, Spiky(spike_step=None, optimizer="adam", lr=3e-3), [pre, callback, post], max_steps=80)
    state = callback._stats[0]
    assert float(state.total_steps) == 80
    assert float(state.total_clipped) <= 4  # at most 5% of the steps
    touched = [s for s in pre.by_step if post.by_step[s] < pre.by_step[s] * (1 - 1e-6)]
    assert len(touched) == float(state.total_clipped)
    for s in touched:  # and never by much
        assert post.by_step[s] > 0.5 * pre.by_step[s]
    assert callback.alerts == [] and "gradient_spike" not in gradwatch_log.text
    assert float(state.mean) == pytest.approx(statistics.fmean(list(pre.by_step.values())[-33:]), rel=0.3)


@pytest.mark.parametrize("optimizer", ["sgd", "adam_fused"])
def test_fp16_overflow_steps_neither_poison_the_statistics_nor_get_clipped(tmp_path: Any, optimizer: str) -> None:
    pre, post = Norms(), Norms()
    callback = AdaptiveClipping(log_every_n_steps=1, warmup_steps=10)
    # a huge initial scale: the first steps overflow (inf norms), as with the default scale on CUDA
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    lr = 1e-3 if optimizer == "adam_fused" else 0.05

    def spike(module: Classifier, step: int) -> None:  # in the fp32 grads: a spike, not an fp16 overflow
        if step == SPIKE_STEP:
            for p in module.parameters():
                p.grad.mul_(100.0)

    model = Spiky(spike_step=None, optimizer=optimizer, lr=lr, hook=spike)
    fit(tmp_path, model, [pre, callback, post], max_steps=50, plugins=[plugin])
    skipped = round(math.log2(2.0**40 / scaler.get_scale()))  # one halving of the scale per overflow
    overflow = [s for s in pre.by_step if not math.isfinite(pre.by_step[s])]
    assert len(overflow) == skipped >= 15  # many overflow steps happened, before the statistics were ready
    for s in overflow:  # left as they were (inf), not turned into NaN or zero: the scaler skips them
        assert post.by_step[s] == pre.by_step[s] or math.isnan(post.by_step[s]) == math.isnan(pre.by_step[s])
    state = callback._stats[0]
    assert float(state.count) == 50 - skipped
    assert all(math.isfinite(float(getattr(state, k))) for k in ("mean", "var"))
    # clipping works afterwards: the spike is clipped, and reported
    normal = statistics.median(pre.by_step[s] for s in range(SPIKE_STEP - 8, SPIKE_STEP))
    assert pre.by_step[SPIKE_STEP] > 50 * normal and post.by_step[SPIKE_STEP] < 2 * normal
    assert [a.began for a in callback.alerts] == [SPIKE_STEP]
    events = tb.scalars(tmp_path / "tb" / "version_0")
    assert all(math.isfinite(v) for _, v in events["gradwatch/clip/ema_mean"])
    assert all(math.isfinite(v) for _, v in events["gradwatch/clip/threshold"])


def test_non_finite_norm_under_32_is_left_to_nanguard(tmp_path: Any) -> None:
    def poison(module: Classifier, step: int) -> None:
        if step == 30:
            next(module.parameters()).grad[0, 0] = math.inf

    pre, post = Norms(), Norms(repair=True)
    callback = AdaptiveClipping()
    model = Spiky(spike_step=None, hook=poison)
    fit(tmp_path, model, [pre, callback, post], max_steps=40)
    assert pre.by_step[30] == math.inf and post.by_step[30] == math.inf  # untouched: not clipped to 0 or NaN
    state = callback._stats[0]
    assert float(state.count) == 39  # not folded into the statistics
    assert math.isfinite(float(state.mean)) and math.isfinite(float(state.var))
    assert callback.alerts == []


def test_manual_optimization_with_accumulation(tmp_path: Any) -> None:
    pre, post = Norms(), Norms()
    callback = AdaptiveClipping()
    fit(tmp_path, ManualSpiky(), [pre, callback, post], max_steps=50)
    clipped_and_reported(pre, post, callback)


def test_automatic_optimization_with_accumulation(tmp_path: Any) -> None:
    pre, post = Norms(), Norms()
    callback = AdaptiveClipping()
    model = Spiky()
    fit(tmp_path, model, [pre, callback, post], max_steps=50, accumulate_grad_batches=2)
    # the spike batch is one of the two micro-batches of step 40 (global_step is the same for both)
    clipped_and_reported(pre, post, callback)


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_checkpoint_resume_restores_the_statistics(tmp_path: Any, mode: str) -> None:
    callback = AdaptiveClipping(mode=mode)  # type: ignore[arg-type]
    trainer = fit(tmp_path, Spiky(), [callback], max_steps=SPIKE_STEP + 5)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
    live = callback._stats[0]
    for key in ("mean", "var", "count", "history", "history_count"):
        value = torch.as_tensor(getattr(live, key), dtype=saved["clip_state"]["0"]["statistics"][key].dtype)
        assert torch.equal(saved["clip_state"]["0"]["statistics"][key], value.cpu())
    assert saved["clip_state"]["0"]["statistics"]["count"].item() == SPIKE_STEP + 5
    assert [a["kind"] for a in saved["alerts"]] == ["gradient_spike"]

    resumed = AdaptiveClipping(mode=mode)  # type: ignore[arg-type]
    seen: dict[str, float] = {}

    class Peek(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            if not seen:
                stats, _ = resumed._state_for(0, torch.device("cpu"), True, 0)
                seen.update({k: v.item() for k, v in stats.to_state().items() if v.numel() == 1})

    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "resume", callbacks=[resumed, Peek()], max_steps=SPIKE_STEP + 10))
    trainer.fit(Spiky(), ckpt_path=path)
    # resumed statistics: no second warm-up, and the state continues from where it was
    assert seen["count"] == SPIKE_STEP + 5 and seen["mean"] == pytest.approx(float(live.mean))
    assert float(resumed._stats[0].count) == SPIKE_STEP + 10
    assert [a.kind for a in resumed.alerts] == ["gradient_spike"]  # the alert history came back too


def test_warns_once_when_trainer_clipping_is_also_set(tmp_path: Any) -> None:
    with pytest.warns(UserWarning, match="gradient_clip_val=0.5"):
        fit(tmp_path, Spiky(spike_step=None), [AdaptiveClipping()], max_steps=3, gradient_clip_val=0.5)


def test_runs_after_the_norm_logger_whatever_the_order(tmp_path: Any) -> None:
    # listed first, the clipper still acts after the norm logger has measured the spike
    clip, logger = AdaptiveClipping(), GradientNormLogger(exploding_factor=None)
    fit(tmp_path, Spiky(), [clip, logger], max_steps=SPIKE_STEP + 1, log_every_n_steps=1)
    events = tb.scalars(tmp_path / "tb" / "version_0")
    logged_norm = dict(events["gradwatch/global/grad_norm"])[SPIKE_STEP]
    pre_clip = dict(events["gradwatch/clip/pre_clip_norm"])[SPIKE_STEP]
    threshold = dict(events["gradwatch/clip/threshold"])[SPIKE_STEP]
    assert logged_norm == pytest.approx(pre_clip, rel=1e-5)
    assert logged_norm > 10 * threshold


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"mode": "autoclip"}, "mode"),
        ({"z_threshold": 0}, "z_threshold"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"quantile": 1.5}, "quantile"),
        ({"history_size": 0}, "history_size"),
        ({"clip_factor": -0.01}, "clip_factor"),
        ({"agc_eps": float("nan")}, "agc_eps"),
        ({"agc_exclude": "head"}, "agc_exclude"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"warmup_cap": 1.0}, "warmup_cap"),
        ({"norm_type": 0.5}, "norm_type"),
        ({"alert_ratio": 0.5}, "alert_ratio"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        AdaptiveClipping(**kwargs)


def test_ddp_ranks_apply_identical_coefficients(tmp_path: Any) -> None:
    rank0, rank1 = run_ddp_script("ddp_adaptive_clipping.py", tmp_path)
    assert rank0["post_norms"] == rank1["post_norms"]  # bit-identical decisions, no collective needed
    assert rank0["state"] == rank1["state"]
    assert rank0["pre_norms"][str(SPIKE_STEP // 2)] > 100 * rank0["post_norms"][str(SPIKE_STEP // 2)]
    assert [a["step"] for a in rank0["alerts"]] == [SPIKE_STEP // 2] == [a["step"] for a in rank1["alerts"]]
