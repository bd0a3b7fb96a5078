"""The alert registry: kinds and causes are named once, and every message is made one way."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_gradwatch import ALERT_CAUSES, ALERT_KIND_INFO, ALERT_KINDS, Alert, AlertCause, AlertKind
from lightning_gradwatch.alerts import alert_message


def test_kinds_and_causes_are_their_strings_and_alerts_hold_plain_strings() -> None:
    assert AlertKind.DEAD_NEURONS == "dead_neurons" and f"{AlertKind.DEAD_NEURONS}" == "dead_neurons"
    assert "dead_neurons" in ALERT_KINDS and all(type(kind) is str for kind in ALERT_KINDS)
    assert set(ALERT_KINDS) == {kind.value for kind in AlertKind} == set(ALERT_KIND_INFO)
    assert set(ALERT_CAUSES) == {cause.value for cause in AlertCause}
    alert = Alert(3, AlertKind.NON_FINITE, "loss", 1.0, 0.0, "m", cause=AlertCause.DIVERGENCE)
    assert type(alert.kind) is str and type(alert.cause) is str
    assert json.loads(json.dumps(alert.to_dict()))["kind"] == "non_finite"
    assert Alert.from_dict(alert.to_dict()) == alert


def test_a_kind_or_cause_that_reaches_a_callbacks_state_is_saved_as_its_string(tmp_path: Path) -> None:
    import torch

    from lightning_gradwatch import GradientNormLogger

    callback = GradientNormLogger()
    callback._active_conditions.add((AlertKind.DEAD_NEURONS, AlertCause.DIVERGENCE))  # as a subclass might keep it
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    loaded = torch.load(path, weights_only=True)  # Lightning's default: plain types only
    assert loaded["active_conditions"] == [["dead_neurons", "divergence"]]
    assert all(type(v) is str for v in loaded["active_conditions"][0])


def test_a_warning_ends_with_its_causes_remedy_or_its_kinds_and_an_info_with_none() -> None:
    finding = "Something at step 3."
    kind_remedy = ALERT_KIND_INFO[AlertKind.NON_FINITE].remedy
    cause_remedy = ALERT_CAUSES[AlertCause.DIVERGENCE].remedy
    assert alert_message(AlertKind.NON_FINITE, finding) == f"{finding} Usual remedies: {kind_remedy}."
    assert alert_message("non_finite", finding, cause="divergence") == f"{finding} Usual remedies: {cause_remedy}."
    assert alert_message(AlertKind.NON_FINITE, finding, "info", cause="divergence") == finding
    assert alert_message("a_kind_of_my_own", finding) == finding  # a kind outside the registry has no remedy


def test_plain_strings_keeps_every_container_and_value_it_does_not_change() -> None:
    from typing import NamedTuple

    import torch

    from lightning_gradwatch.alerts import plain_strings

    class Pair(NamedTuple):
        kind: str
        value: float

    tensor = torch.ones(2)
    state = {AlertKind.SATURATION: [Pair(AlertKind.NON_FINITE, 1.0), (AlertCause.BAD_INPUT, tensor)], "n": 3}
    plain = plain_strings(state)
    assert plain == {"saturation": [Pair("non_finite", 1.0), ("bad_input", tensor)], "n": 3}
    assert type(next(iter(plain))) is str and type(plain["saturation"][0]) is Pair
    assert type(plain["saturation"][0].kind) is str and plain["saturation"][1][1] is tensor
