"""Argument types that carry their range, so that LightningCLI (jsonargparse) rejects a bad value in one line.

With jsonargparse installed (it comes with ``lightning[extra]`` and LightningCLI), these are its restricted number
types, subclasses of ``int``/``float`` that the parser checks; without it they are plain ``int``/``float``. Either
way every callback validates its arguments in ``__init__`` too, and type checkers see plain numbers.

Each type's range is exactly its ``__init__`` check (``tests/test_cli_types.py`` walks every public signature and
tries values on both sides of every bound), so a value the parser lets through never fails later with a
traceback.

``Null`` stands where an argument is optional (``PositiveInt | Null``): type checkers read it as ``None``; the
parser accepts YAML's ``null`` and also ``None`` and ``none``, which YAML reads as strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "AtLeastFiveInt",
    "AtLeastOne",
    "AtLeastThreeInt",
    "FinitePositiveFloat",
    "GreaterThanOne",
    "NonNegativeInt",
    "Null",
    "OpenHalfUnit",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "UnitFraction",
]

#: How ``None`` may be written in a LightningCLI YAML or on the command line for an optional argument.
NULL_SPELLINGS = ("null", "None", "none")

if TYPE_CHECKING:
    from typing import TypeAlias

    PositiveFloat: TypeAlias = float
    FinitePositiveFloat: TypeAlias = float
    PositiveInt: TypeAlias = int
    NonNegativeInt: TypeAlias = int
    AtLeastThreeInt: TypeAlias = int
    AtLeastFiveInt: TypeAlias = int
    OpenUnitInterval: TypeAlias = float
    UnitFraction: TypeAlias = float
    OpenHalfUnit: TypeAlias = float
    GreaterThanOne: TypeAlias = float
    AtLeastOne: TypeAlias = float
    Null: TypeAlias = None
else:
    try:
        from jsonargparse.typing import (
            NonNegativeInt,
            OpenUnitInterval,
            PositiveFloat,
            PositiveInt,
            register_type,
            restricted_number_type,
        )
    except ImportError:  # no LightningCLI in this environment: plain numbers
        PositiveFloat = FinitePositiveFloat = OpenUnitInterval = UnitFraction = OpenHalfUnit = float
        GreaterThanOne = AtLeastOne = float
        PositiveInt = NonNegativeInt = AtLeastThreeInt = AtLeastFiveInt = int
        Null = type(None)
    else:
        FinitePositiveFloat = restricted_number_type("FinitePositiveFloat", float, [(">", 0), ("<", float("inf"))])
        AtLeastThreeInt = restricted_number_type("AtLeastThreeInt", int, (">=", 3))
        AtLeastFiveInt = restricted_number_type("AtLeastFiveInt", int, (">=", 5))
        UnitFraction = restricted_number_type("UnitFraction", float, [(">", 0), ("<=", 1)])
        OpenHalfUnit = restricted_number_type("OpenHalfUnit", float, [(">", 0), ("<", 0.5)])
        GreaterThanOne = restricted_number_type("GreaterThanOne", float, (">", 1))
        AtLeastOne = restricted_number_type("AtLeastOne", float, (">=", 1))

        class Null:
            """``None``, written ``null``, ``None`` or ``none``."""

        Null.__name__ = Null.__qualname__ = "None"  # the help reads "Union[PositiveInt, None]"

        def _null(value: Any) -> None:
            if value is None or (isinstance(value, str) and value.strip() in NULL_SPELLINGS):
                return None
            raise ValueError("expected null (None and none are read as null too)")

        register_type(Null, serializer=lambda value: None, deserializer=_null, type_check=lambda v, t: v is None)
