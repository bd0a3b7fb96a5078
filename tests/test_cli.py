"""The LightningCLI config in examples/ attaches every callback and trains; bad values fail by name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_gradwatch._base import GradwatchCallback

EXAMPLES = Path(__file__).parent.parent / "examples"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("train_mlp", EXAMPLES / "train_mlp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered as an import would be: jsonargparse resolves the example's postponed annotations through
    # sys.modules (releases before 4.51 find no class arguments otherwise).
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(tmp_path: Path, *extra: str) -> Any:
    return load_example().main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "gradwatch.yaml"),
            "--trainer.max_steps=30",
            "--trainer.log_every_n_steps=5",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.limit_val_batches=2",
            "--data.samples=2000",
            *extra,
        ]
    )


def test_example_config_attaches_every_callback_class_and_trains(tmp_path: Path) -> None:
    import lightning_gradwatch

    cli = run_cli(tmp_path)
    attached = {type(cb).__name__ for cb in cli.trainer.callbacks if isinstance(cb, GradwatchCallback)}
    exported = {
        name
        for name in lightning_gradwatch.__all__
        if isinstance(getattr(lightning_gradwatch, name), type)
        and issubclass(getattr(lightning_gradwatch, name), GradwatchCallback)
    }
    assert attached == exported and "GradientNormLogger" in attached
    assert cli.trainer.global_step == 30
    assert list(tmp_path.glob("train_mlp/version_0/events.out.tfevents.*"))
    for cb in cli.trainer.callbacks:
        if isinstance(cb, GradwatchCallback):
            assert cb.alerts == [], cb.alerts  # the healthy default network raises nothing


def test_sick_network_from_the_command_line_alerts(tmp_path: Path) -> None:
    cli = run_cli(tmp_path, "--model.activation=sigmoid", "--model.depth=16")
    kinds = {a.kind for cb in cli.trainer.callbacks if isinstance(cb, GradwatchCallback) for a in cb.alerts}
    assert "vanishing_gradient" in kinds


def test_config_values_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load((EXAMPLES / "gradwatch.yaml").read_text())
    norm_logger = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("GradientNormLogger"))
    norm_logger["init_args"]["group_by"] = "layer"  # not one of the Literal choices
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        load_example().main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    assert "group_by" in capsys.readouterr().err

    norm_logger["init_args"]["group_by"] = "module"
    norm_logger["init_args"]["vanishing_ratio"] = -1.0  # the right type, a bad value: the parser names it
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        load_example().main(["fit", "--config", str(bad), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert 'Parser key "vanishing_ratio"' in capsys.readouterr().err
