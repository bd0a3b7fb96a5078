"""The one-line preset: GradWatch from Python and from a LightningCLI YAML."""

from __future__ import annotations

import inspect
import json
import math
import typing
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_gradwatch import GradWatch, NaNGuard, default_callbacks, preset
from tests import tensorboard_events as tb
from tests.models import Classifier, mlp, trainer_kwargs
from tests.test_cli import EXAMPLES, load_example


class NaNAt(Classifier):
    def __init__(self, step: int) -> None:
        super().__init__(mlp(3, width=64))
        self.nan_step = step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.nan_step:
            x = x * float("nan")
        return F.cross_entropy(self(x), y)


def test_healthy_run_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    watch = GradWatch()
    # defaults: activations sampled every 10 steps, checked every 10 samples: the first check at step 90
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_steps=91))
    trainer.fit(Classifier(mlp(3, width=64), lr=1e-3, optimizer="adam"))
    assert watch.alerts == []
    assert "gradwatch: healthy run" in capsys.readouterr().out
    [layout] = tb.layouts(tmp_path / "tb" / "version_0")  # one merged layout for the whole bundle
    assert {"gradwatch: gradients", "gradwatch: activations", "gradwatch: clipping", "gradwatch: guard"} <= set(layout)
    tags = tb.scalars(tmp_path / "tb" / "version_0")
    assert {"gradwatch/global/grad_norm", "gradwatch/clip/pre_clip_norm", "gradwatch/guard/faults"} <= set(tags)
    assert any(t.startswith("gradwatch/dead_fraction/") for t in tags)


def test_order_is_correct_by_construction_and_the_guard_halts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    watch = GradWatch()
    assert [type(cb).__name__ for cb in watch.gradwatch_callbacks] == [
        "NaNGuard", "SetupCheck", "LossSpikeGuard", "GradientNormLogger", "DeadNeuronCallback",
        "SaturationCallback", "AdaptiveClipping", "HealthReport",
    ]  # fmt: skip
    model = NaNAt(step=6)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_steps=40, enable_checkpointing=True))
    trainer.fit(model)
    assert trainer.global_step == 7 and all(torch.isfinite(p).all() for p in model.parameters())
    assert [a.kind for a in watch.alerts] == ["non_finite"]
    # the guard dropped the NaN gradients before the norm logger and the clipper saw them
    logged = dict(tb.scalars(tmp_path / "tb" / "version_0")["gradwatch/global/grad_norm"])
    assert 6 not in logged and all(math.isfinite(v) for v in logged.values())
    clip = watch.gradwatch_callbacks[6]
    assert math.isfinite(float(clip._stats[0].mean))
    out = capsys.readouterr().out
    # the NaN was in the batch: a data problem, with its remedy; the halt step is the alert's step
    assert "Non-finite input data" in out and "stopped at step 6 by NaNGuard" in out
    report = json.loads(Path(tmp_path / "tb" / "version_0" / "gradwatch_report.json").read_text())
    assert report["stopped_early"] and report["stopped_at"] == 6 == watch.alerts[0].step
    assert report["findings"][0]["kind"] == "non_finite" and report["findings"][0]["cause"] == "bad_input"


def test_bundle_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    watch = GradWatch(nan_action="skip")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[watch], max_steps=8))
    trainer.fit(NaNAt(step=3))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = GradWatch(nan_action="skip")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed], max_steps=10))
    trainer.fit(NaNAt(step=100), ckpt_path=tmp_path / "a.ckpt")
    guard = resumed.gradwatch_callbacks[0]
    assert isinstance(guard, NaNGuard) and guard.fault_steps == 1
    assert [a.step for a in resumed.alerts] == [3]


def test_preset_from_lightning_cli_yaml(tmp_path: Path) -> None:
    cli = load_example().main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "gradwatch_preset.yaml"),
            "--trainer.max_steps=20",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.limit_val_batches=2",
            "--data.samples=2000",
            "--trainer.callbacks.init_args.nan_action=rollback",
        ]
    )
    [watch] = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradWatch)]
    assert watch.gradwatch_callbacks[0].action == "rollback"  # type: ignore[attr-defined]
    assert cli.trainer.global_step == 20


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"nan_action": "panic"}, "nan_action"),
        ({"clipping": "static"}, "clipping"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        default_callbacks(**kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        GradWatch(**kwargs)


def compiled_model(how: str) -> Any:
    net = mlp(3, width=64)
    if how == "submodule":
        return Classifier(torch.compile(net, backend="eager"))
    # Lightning compiles training_step too, where dynamo cannot trace self.log: a model that does not log
    return torch.compile(NaNAt(step=-1), backend="eager")


def fit_counting_graphs(tmp_path: Path, how: str, callbacks: list[Any]) -> int:
    """Fit a model compiled ``how`` and return how many graphs torch.compile built (one more per recompilation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_steps=12)).fit(compiled_model(how))
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("how", ["submodule", "lightning_module"])
def test_compiled_model_gradients_and_activations_watched_graph_untouched(
    tmp_path: Path, how: str, recwarn: pytest.WarningsRecorder
) -> None:
    watch = GradWatch(log_every_n_steps=2)
    graphs = fit_counting_graphs(tmp_path, how, [watch])
    # no hook or mode reaches the traced code: no recompilation (the activations are read from an eager pass)
    assert graphs >= 1 and graphs == fit_counting_graphs(tmp_path / "bare", how, [])
    assert not [str(w.message) for w in recwarn if "is inactive in this run" in str(w.message)]
    tags = tb.scalars(tmp_path / "tb" / "version_0")
    # watched under the model's own layer names (no torch.compile wrapper segment)
    assert {"gradwatch/grad_norm/net.0", "gradwatch/grad_norm/net.6", "gradwatch/clip/pre_clip_norm"} <= set(tags)
    assert {"gradwatch/dead_fraction/net.0", "gradwatch/saturation/net.0"} & set(tags)


def test_the_bundle_passes_on_every_hook_a_bundled_callback_implements() -> None:
    from lightning.pytorch.callbacks import Callback

    from lightning_gradwatch.preset import BUNDLE_HOOKS

    hooks = [n for n in dir(Callback) if n.startswith("on_") or n in ("setup", "teardown")]
    hooks = [n for n in hooks if n not in ("on_load_checkpoint", "on_save_checkpoint")]  # the bundle's own
    bundled = {type(cb) for cb in GradWatch(clipping="agc").gradwatch_callbacks}
    implemented = {h for cls in bundled for h in hooks if getattr(cls, h) is not getattr(Callback, h)}
    assert implemented <= set(BUNDLE_HOOKS), sorted(implemented - set(BUNDLE_HOOKS))
    assert set(BUNDLE_HOOKS) <= implemented  # and none passed on that no callback implements


def test_grad_watch_and_default_callbacks_take_one_signature() -> None:
    # GradWatch(...) is default_callbacks(...) bundled: the same arguments, in the same order, with the same
    # defaults and hints, so that neither can gain an option the other lacks (LightningCLI reads GradWatch's)
    bundle = list(inspect.signature(preset.GradWatch.__init__).parameters.values())[1:]  # without self
    function = list(inspect.signature(preset.default_callbacks).parameters.values())
    assert [(p.name, p.default, p.kind) for p in bundle] == [(p.name, p.default, p.kind) for p in function]
    hints = typing.get_type_hints(preset.GradWatch.__init__)
    assert {p.name: hints[p.name] for p in bundle} == {
        p.name: typing.get_type_hints(preset.default_callbacks)[p.name] for p in function
    }
