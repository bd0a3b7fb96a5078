"""Argument types that carry their range, so that LightningCLI (jsonargparse) rejects a bad value in one line.

With jsonargparse installed (it comes with ``lightning[extra]`` and LightningCLI), these are its restricted number
types, subclasses of ``int``/``float`` that the parser checks; without it they are plain ``int``/``float``. Either
way every callback validates its arguments in ``__init__`` too, and type checkers see plain numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "AtLeastOne",
    "GreaterThanOne",
    "OpenHalfUnit",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "UnitFraction",
]

if TYPE_CHECKING:
    PositiveFloat = float
    PositiveInt = int
    OpenUnitInterval = float
    UnitFraction = float
    OpenHalfUnit = float
    GreaterThanOne = float
    AtLeastOne = float
else:
    try:
        from jsonargparse.typing import OpenUnitInterval, PositiveFloat, PositiveInt, restricted_number_type
    except ImportError:  # no LightningCLI in this environment: plain numbers
        PositiveFloat = OpenUnitInterval = UnitFraction = OpenHalfUnit = GreaterThanOne = AtLeastOne = float
        PositiveInt = int
    else:
        UnitFraction = restricted_number_type("UnitFraction", float, [(">", 0), ("<=", 1)])
        OpenHalfUnit = restricted_number_type("OpenHalfUnit", float, [(">", 0), ("<", 0.5)])
        GreaterThanOne = restricted_number_type("GreaterThanOne", float, (">", 1))
        AtLeastOne = restricted_number_type("AtLeastOne", float, (">=", 1))
