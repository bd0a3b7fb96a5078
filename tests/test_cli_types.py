"""Every public argument's type hint carries exactly its ``__init__`` check, so LightningCLI (jsonargparse) rejects
a bad value at parse time, in a short error naming the argument, and never lets through a value that ``__init__``
then refuses with a long traceback.

The test walks the signature of every public callback, ``GradWatch`` and ``default_callbacks``, and tries values
on both sides of every bound each numeric argument could have.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from typing import Any

import pytest
import yaml

jsonargparse = pytest.importorskip("jsonargparse")

import lightning_gradwatch  # noqa: E402
from lightning_gradwatch.core.callback import GradwatchCallback  # noqa: E402

PUBLIC: list[Callable[..., Any]] = [
    getattr(lightning_gradwatch, name)
    for name in lightning_gradwatch.__all__
    if isinstance(getattr(lightning_gradwatch, name), type)
    and issubclass(getattr(lightning_gradwatch, name), GradwatchCallback)
] + [lightning_gradwatch.GradWatch, lightning_gradwatch.default_callbacks]

# Values on both sides of every bound in use (0, 0.5, 1, 3, 5), fractions, huge, infinite, NaN, wrong types.
PROBES: list[Any] = [-1, 0, 1e-9, 0.25, 0.4999, 0.5, 0.75, 1, 1.0, 1.5, 2, 3, 4, 5, 6, 1e6, math.inf, -math.inf]
PROBES += [math.nan, True, "3", "inf", None, "None", "none"]


def _function(target: Callable[..., Any]) -> Callable[..., Any]:
    return target.__init__ if isinstance(target, type) else target  # type: ignore[misc]


def _numeric_parameters(target: Callable[..., Any]) -> list[str]:
    """The arguments whose hint (as type checkers read it) holds an int or a float."""
    hints = typing.get_type_hints(_function(target))
    names = []
    for name in inspect.signature(_function(target)).parameters:
        hint = hints.get(name)
        args = set(typing.get_args(hint)) | {hint}
        if {int, float} & args or any(isinstance(a, type) and issubclass(a, (int, float)) for a in args):
            if hint is not bool:
                names.append(name)
    return names


CASES = [(target, name) for target in PUBLIC for name in _numeric_parameters(target)]


def _parser(target: Callable[..., Any]) -> Any:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    if isinstance(target, type):
        parser.add_class_arguments(target, "x")
    else:
        parser.add_function_arguments(target, "x")
    return parser


def _accepted_by_init(target: Callable[..., Any], name: str, value: Any) -> bool:
    try:
        target(**{name: value})
    except ValueError as error:
        assert f"`{name}`" in str(error), error  # the check names the argument
        return False
    return True


def test_every_public_numeric_argument_is_walked() -> None:
    walked = {(getattr(t, "__name__", t), n) for t, n in CASES}
    # the three the issue names, and GradWatch's own
    assert {("LossSpikeGuard", "window"), ("NaNGuard", "min_loss_scale"), ("GradientGeometry", "power_iterations")}
    assert ("LossSpikeGuard", "window") in walked and ("NaNGuard", "min_loss_scale") in walked
    assert ("GradientGeometry", "power_iterations") in walked and ("GradWatch", "log_every_n_steps") in walked
    assert len(walked) >= 50


@pytest.mark.parametrize(("target", "name"), CASES, ids=[f"{getattr(t, '__name__', t)}.{n}" for t, n in CASES])
def test_hint_accepts_exactly_what_init_accepts(target: Callable[..., Any], name: str) -> None:
    parser = _parser(target)
    optional = type(None) in typing.get_args(typing.get_type_hints(_function(target))[name])
    disagreements = []
    # jsonargparse lets a YAML null through for any argument (it reads it as "not set"): only where the argument
    # is optional does the hint decide about None
    for value in PROBES if optional else [p for p in PROBES if p is not None]:
        try:
            parsed = parser.parse_string(yaml.safe_dump({"x": {name: value}})).x[name]  # as a YAML config is read
        except jsonargparse.ArgumentError as error:
            message = str(error)
            assert f'"x.{name}"' in message or f'"{name}"' in message, message  # the error names the argument
            if _accepted_by_init(target, name, value) and not isinstance(value, str):
                disagreements.append(f"{value!r}: the hint rejects it, __init__ accepts it")
            continue
        if not _accepted_by_init(target, name, parsed):
            disagreements.append(f"{value!r} (parsed {parsed!r}): the hint accepts it, __init__ refuses it")
    assert not disagreements, f"{getattr(target, '__name__', target)}({name}=...): " + "; ".join(disagreements)


@pytest.mark.parametrize("spelling", ["None", "none", None])
def test_optional_arguments_take_none_as_yaml_spells_it(spelling: Any) -> None:
    parser = _parser(lightning_gradwatch.GradWatch)
    config = {"x": {"clipping": spelling, "spikes": spelling, "log_every_n_steps": spelling}}
    parsed = parser.parse_string(yaml.safe_dump(config)).x
    assert (parsed["clipping"], parsed["spikes"], parsed["log_every_n_steps"]) == (None, None, None)
    kinds = {type(cb).__name__ for cb in lightning_gradwatch.GradWatch(**dict(parsed)).gradwatch_callbacks}
    assert "AdaptiveClipping" not in kinds and "LossSpikeGuard" not in kinds
