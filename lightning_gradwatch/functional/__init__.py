"""Pure tensor math behind the callbacks: tensors in, tensors out, testable without a Trainer."""

from lightning_gradwatch.functional.norms import (
    combine_norms,
    grouped_norms,
    power_means,
    tensor_norms,
    validate_norm_type,
)

__all__ = [
    "combine_norms",
    "grouped_norms",
    "power_means",
    "tensor_norms",
    "validate_norm_type",
]
