"""The contract a gradwatch callback is written against.

- :class:`GradwatchCallback`: the base class (alerts and their episodes, the metrics row, the TensorBoard layout,
  checkpointed state); a subclass puts its work on a step's final gradients in ``_before_optimizer_step``.
- :class:`HookOrder`: where that work runs among the gradwatch callbacks, by role.
- :class:`Session` (:func:`session_of`): what the gradwatch callbacks of one Trainer share, and the one dispatch of
  each optimizer step.
- :class:`StepGradients`: one step's gradients, parameters and the norms every callback shares;
  :func:`device_path`: a block in which a CPU takes the device path a GPU takes (every decision on the device).
- :class:`DeclaredState` with :func:`scalar` and :func:`buffer`: checkpointed state declared once (default, device
  or host, save, load, named host values);
- :func:`host_values`: device tensors to the host in one transfer (a logging step's one sync);
  :func:`group_of`: the layer (module) a parameter name belongs to, as alerts and charts name it.
- :func:`check_number`, :func:`check_bool`, :func:`check_choice`: argument checks that name the argument; the
  range types (``PositiveInt``, ``UnitFraction``, ... and ``Null``) that LightningCLI checks at parsing.

docs/development.md shows the smallest real callback written against it.
"""

from lightning_gradwatch._params import group_of
from lightning_gradwatch._reporting import host_values
from lightning_gradwatch._step import StepGradients, device_path
from lightning_gradwatch._types import (
    AtLeastFiveInt,
    AtLeastOne,
    AtLeastThreeInt,
    FinitePositiveFloat,
    GreaterThanOne,
    NonNegativeInt,
    Null,
    OpenHalfUnit,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    UnitFraction,
)
from lightning_gradwatch._validation import check_bool, check_choice, check_number
from lightning_gradwatch.core.callback import REARM_STEPS, GradwatchCallback, HookOrder
from lightning_gradwatch.core.session import Session, session_of
from lightning_gradwatch.core.state import DeclaredState, buffer, scalar
from lightning_gradwatch.functional._scalars import Flag, Scalar

__all__ = [
    "REARM_STEPS",
    "Scalar",
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
    "DeclaredState",
    "Flag",
    "GradwatchCallback",
    "HookOrder",
    "Session",
    "StepGradients",
    "check_bool",
    "check_choice",
    "buffer",
    "check_number",
    "device_path",
    "group_of",
    "host_values",
    "scalar",
    "session_of",
]
