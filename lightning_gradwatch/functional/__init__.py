"""Pure tensor math behind the callbacks: tensors in, tensors out, testable without a Trainer."""

from lightning_gradwatch.functional.activations import (
    alive_units,
    dead_fractions,
    saturated_count,
    saturation_bound,
    segment_sum,
)
from lightning_gradwatch.functional.clipping import (
    agc_coefficients,
    apply_clip_coefficient,
    clip_coefficient,
    ema_update,
    zscore_threshold,
)
from lightning_gradwatch.functional.dynamics import (
    nonzero_counts,
    snapshot_for_update,
    update_norms,
    update_ratios,
    zero_fractions,
)
from lightning_gradwatch.functional.finite import any_non_finite, may_be_non_finite, non_finite_mask
from lightning_gradwatch.functional.geometry import (
    gain_product,
    gradient_coherence,
    relative_perturbation,
    row_cosine,
    segment_spectrum,
)
from lightning_gradwatch.functional.noise_scale import (
    noise_scale_ema_update,
    noise_scale_readout,
    noise_scale_state,
    noise_scale_terms,
)
from lightning_gradwatch.functional.norms import (
    combine_norms,
    global_norm,
    grouped_norms,
    power_means,
    tensor_norms,
    total_norm,
    validate_norm_type,
)
from lightning_gradwatch.functional.rings import ring_push, ring_quantile
from lightning_gradwatch.functional.through_time import (
    decay_per_step,
    lag_sensitivity,
    memory_horizon,
    state_sensitivity,
)

__all__ = [
    "alive_units",
    "dead_fractions",
    "segment_sum",
    "saturated_count",
    "saturation_bound",
    "any_non_finite",
    "may_be_non_finite",
    "non_finite_mask",
    "agc_coefficients",
    "apply_clip_coefficient",
    "clip_coefficient",
    "ema_update",
    "global_norm",
    "ring_push",
    "ring_quantile",
    "total_norm",
    "zscore_threshold",
    "combine_norms",
    "grouped_norms",
    "power_means",
    "tensor_norms",
    "validate_norm_type",
    "gain_product",
    "gradient_coherence",
    "relative_perturbation",
    "row_cosine",
    "segment_spectrum",
    "noise_scale_ema_update",
    "noise_scale_readout",
    "noise_scale_state",
    "noise_scale_terms",
    "nonzero_counts",
    "snapshot_for_update",
    "update_norms",
    "update_ratios",
    "zero_fractions",
    "decay_per_step",
    "lag_sensitivity",
    "memory_horizon",
    "state_sensitivity",
]
