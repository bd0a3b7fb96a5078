"""Nothing found is lost across a resume or at the end of a run; misuse fails early with a clear message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_gradwatch import (
    AdaptiveClipping,
    DeadNeuronCallback,
    GradientNormLogger,
    GradWatch,
    NaNGuard,
    SaturationCallback,
    default_callbacks,
)
from tests.models import Classifier, mlp, trainer_kwargs
from tests.test_adaptive_clipping import SPIKE_STEP, Spiky
from tests.test_cli import EXAMPLES, load_example
from tests.test_nan_guard import Poisoned


def test_resume_with_other_arguments_keeps_what_still_applies(tmp_path: Path) -> None:
    watch = GradWatch(nan_action="skip")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[watch], max_steps=12))
    trainer.fit(Poisoned(nan_steps=(3,)))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    saved_alerts = watch.alerts
    assert [a.kind for a in saved_alerts] == ["non_finite"]

    # the halt message invites a resume; with other arguments the state keys differ
    resumed = GradWatch(nan_action="rollback", clipping="percentile")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=14))
    with pytest.warns(UserWarning, match=r"AdaptiveClipping resumed with other arguments \(mode='zscore' -> "):
        trainer.fit(Poisoned(), ckpt_path=tmp_path / "a.ckpt")
    by_type = {type(cb): cb for cb in resumed.gradwatch_callbacks}
    guard, norms, clip = by_type[NaNGuard], by_type[GradientNormLogger], by_type[AdaptiveClipping]
    assert isinstance(guard, NaNGuard) and guard.fault_steps == 1 and guard.alerts == saved_alerts
    # the same norm: the history carried on (11 logged steps, the NaN step 3 dropped, then 2 more)
    assert isinstance(norms, GradientNormLogger) and len(norms._history[""]) == 13
    assert isinstance(clip, AdaptiveClipping) and float(clip._stats[0].count) == 2  # new rule: a new warm-up


def test_separate_callbacks_resume_into_the_bundle(tmp_path: Path) -> None:
    guard = NaNGuard(action="skip")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[guard], max_steps=6))
    trainer.fit(Poisoned(nan_steps=(3,)))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    watch = GradWatch()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[watch], max_steps=8))
    trainer.fit(Poisoned(), ckpt_path=tmp_path / "a.ckpt")
    assert [a.step for a in watch.alerts] == [3] and watch.gradwatch_callbacks[0].fault_steps == 1  # type: ignore[attr-defined]


class SaveAt(Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def spike_run(
    tmp_path: Path, max_steps: int, ckpt: Path | None = None, *callbacks: Callback
) -> tuple[AdaptiveClipping, pl.Trainer]:
    clip = AdaptiveClipping(log_every_n_steps=10)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[clip, *callbacks], max_steps=max_steps))
    trainer.fit(Spiky(), ckpt_path=ckpt)
    return clip, trainer


def test_a_spike_just_before_a_checkpoint_is_reported_after_resume(tmp_path: Path) -> None:
    # logging steps 9, 19, 29, 39, 49: the spike at 40 is still unreported when the checkpoint at 42 is taken
    spike_run(tmp_path / "a", SPIKE_STEP + 8, None, SaveAt(SPIKE_STEP + 2, tmp_path / "a.ckpt"))
    resumed, _ = spike_run(tmp_path / "b", SPIKE_STEP + 15, tmp_path / "a.ckpt")
    spikes = [a for a in resumed.alerts if a.kind == "gradient_spike"]
    assert [a.began for a in spikes] == [SPIKE_STEP]
    # the interval the report covers, to the next logging step (lightning < 2.5 counts one more step after a resume)
    assert re.search(rf"in steps {SPIKE_STEP // 10 * 10}-(49|50);", spikes[0].message), spikes[0].message


def test_a_spike_after_the_last_logging_step_is_reported_once_at_the_end(tmp_path: Path) -> None:
    clip, _ = spike_run(tmp_path, SPIKE_STEP + 3)
    assert [a.began for a in clip.alerts if a.kind == "gradient_spike"] == [SPIKE_STEP]


class LBFGSModel(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


def test_closure_optimizers_count_optimizer_steps_not_closure_evaluations(tmp_path: Path) -> None:
    clip, norms = AdaptiveClipping(), GradientNormLogger(log_every_n_steps=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[norms, clip], max_steps=10))
    trainer.fit(LBFGSModel(mlp(2)))
    assert float(clip._stats[0].total_steps) == 10 == float(clip._stats[0].count)  # not up to 5x more
    assert len(norms._history[""]) == 10


def test_duplicate_callbacks_beside_the_preset_are_refused(tmp_path: Path) -> None:
    twice: list[list[Callback]] = [
        [GradWatch(), AdaptiveClipping()],
        [*default_callbacks(), GradWatch()],
        [AdaptiveClipping(), AdaptiveClipping(mode="percentile")],  # distinct state keys, still clipping twice
    ]
    for callbacks in twice:
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_steps=2))
        with pytest.raises(ValueError, match="gradwatch callbacks collide: .*AdaptiveClipping 2 times"):
            trainer.fit(Classifier(mlp(1)))
    # two norm loggers with different settings may share a Trainer (documented)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradientNormLogger(), GradientNormLogger(2.5)]))
    trainer.fit(Classifier(mlp(1)))


def test_the_preset_class_instead_of_an_instance_is_a_clear_type_error(tmp_path: Path) -> None:
    try:
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradWatch], max_steps=2))  # type: ignore[list-item]
    except ValueError as err:  # lightning < 2.5 rejects the list itself, before any hook of ours can run
        assert "Expected a parent" in str(err)
        return
    with pytest.raises(TypeError, match=r"pass an instance: Trainer\(callbacks=\[GradWatch\(\)\]\)"):
        trainer.fit(Classifier(mlp(1)))


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: GradWatch(activations="false"), "activations"),  # type: ignore[arg-type]
        (lambda: GradWatch(report=1), "report"),  # type: ignore[arg-type]
        (lambda: GradientNormLogger(log_grad_to_weight="no"), "log_grad_to_weight"),  # type: ignore[arg-type]
        (lambda: NaNGuard(save_checkpoint_on_halt=None), "save_checkpoint_on_halt"),  # type: ignore[arg-type]
        (lambda: AdaptiveClipping(agc_exclude=5), "agc_exclude"),  # type: ignore[arg-type]
        (lambda: AdaptiveClipping(agc_exclude="head.*"), "agc_exclude"),
        (lambda: DeadNeuronCallback(window=2.5), "window"),  # type: ignore[arg-type]
    ],
)
def test_arguments_of_the_wrong_kind_raise_naming_them(make: Any, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make()


def test_numpy_scalars_are_numbers() -> None:
    logger = GradientNormLogger(log_every_n_steps=np.int64(10), exploding_factor=np.float32(3.0))
    assert logger.log_every_n_steps == 10 and type(logger.log_every_n_steps) is int
    assert SaturationCallback(threshold=np.float64(0.5)).threshold == 0.5
    assert NaNGuard(max_rollbacks=np.int32(2)).max_rollbacks == 2


def test_a_bad_value_from_lightning_cli_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load((EXAMPLES / "gradwatch.yaml").read_text())
    dead = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DeadNeuronCallback"))
    dead["init_args"]["threshold"] = -0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        load_example().main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.split("error:", 1)[1]  # after jsonargparse's usage lines
    assert "-0.5 does not conform to restriction v>0 and v<=1" in error and "Traceback" not in error
