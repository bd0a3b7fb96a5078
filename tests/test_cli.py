"""The LightningCLI config in examples/ attaches every callback and trains; bad values fail by name; the help and
the errors of the real command line read as a user needs them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_gradwatch.core.callback import GradwatchCallback

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


# -- what a user sees in a terminal: help and errors of the real command line --------------------------------------


def run_example(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python examples/train_mlp.py ...`` as a user types it, its output as the terminal shows it."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "train_mlp.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent), "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def config_with(tmp_path: Path, class_path: str, **init_args: Any) -> str:
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": class_path, "init_args": init_args}],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_callback_help_reads_as_plain_text(tmp_path: Path) -> None:
    shown = run_example(tmp_path, "fit", "--trainer.callbacks.help", "lightning_gradwatch.GradWatch")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    heading = next(line for line in text.splitlines() if line.startswith("Every gradwatch"))
    assert heading == "Every gradwatch guard and monitor in one Lightning callback, with coordinated defaults:"
    for markup in ("``", ":class:", ":func:", ":attr:"):
        assert markup not in text, f"raw markup {markup!r} in the help"
    for argument in ("nan_action", "clipping", "activations", "report", "log_every_n_steps", "spikes"):
        assert f"--trainer.callbacks.{argument}" in text
    assert "halt (stop, saving a" in text and "or null for no" in text
    assert "gradwatch_report.md" in text and "Custom Scalars" in text and "docs/" in text  # where to look
    assert "NanAction" not in text and "ClipMode" not in text  # no private aliases


def test_help_of_gradwatch_in_python_is_what_a_user_needs() -> None:
    import pydoc

    from lightning_gradwatch import GradWatch

    text = pydoc.render_doc(GradWatch, renderer=pydoc.plaintext)
    assert len(text.splitlines()) < 100, len(text.splitlines())
    assert "Forwards" not in text and "on_train_batch_end" not in text  # the hook plumbing stays out
    first = text.splitlines()[3]  # the signature line
    assert "Literal['halt', 'skip', 'rollback']" in first and "int | None" in first and "'NanAction'" not in first
    for needed in ("gradwatch_report.md", "gradwatch/alerts/<kind>/text_summary", "Alert", "docs/"):
        assert needed in text


def test_a_bad_choice_names_the_argument_the_value_and_the_choices(tmp_path: Path) -> None:
    shown = run_example(
        tmp_path, "fit", "--config", config_with(tmp_path, "lightning_gradwatch.GradWatch", nan_action="explode")
    )
    assert shown.returncode == 2
    assert "Traceback" not in shown.stderr
    lines = shown.stderr.splitlines()
    key = next(i for i, line in enumerate(lines) if 'Parser key "nan_action"' in line)
    assert "Literal['halt', 'skip', 'rollback']" in lines[key + 1] and "explode" in lines[key + 1]


def test_a_value_outside_the_range_fails_at_parsing_not_with_a_traceback(tmp_path: Path) -> None:
    # LossSpikeGuard.window's hint was a plain positive int while __init__ wants >= 3: an 80-line traceback
    shown = run_example(
        tmp_path, "fit", "--config", config_with(tmp_path, "lightning_gradwatch.LossSpikeGuard", window=2)
    )
    assert shown.returncode == 2, shown.stderr[-2000:]
    error = shown.stderr[shown.stderr.index("error:") :]  # after argparse's usage lines
    assert "Traceback" not in shown.stderr and len(error.splitlines()) < 25, error
    lines = error.splitlines()
    key = next(i for i, line in enumerate(lines) if 'Parser key "window"' in line)
    assert "v>=3" in lines[key + 1]


def test_yaml_none_turns_an_option_off(tmp_path: Path) -> None:
    # YAML reads None and none as strings; for an optional argument they mean null, as null does
    path = tmp_path / "config.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_gradwatch.GradWatch\n      init_args:\n"
        "        clipping: None\n        spikes: none\n        log_every_n_steps: null\n"
    )
    shown = run_example(tmp_path, "fit", "--config", str(path), "--print_config")
    assert shown.returncode == 0, shown.stderr[-2000:]
    for argument in ("clipping", "spikes", "log_every_n_steps"):
        assert f"      {argument}: null" in shown.stdout, shown.stdout
