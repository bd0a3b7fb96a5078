import math

import pytest
import torch

from lightning_gradwatch.functional import combine_norms, grouped_norms, power_means, tensor_norms, validate_norm_type


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_grouped_norms_match_torch(p: float) -> None:
    tensors = [torch.randn(5, 3), torch.randn(3), torch.randn(2, 2, 2), torch.randn(7)]
    index = torch.tensor([0, 0, 1, 2])
    groups, total = grouped_norms(tensors, index, 3, p)
    expected = [
        torch.linalg.vector_norm(torch.cat([tensors[0].flatten(), tensors[1]]), p),
        torch.linalg.vector_norm(tensors[2], p),
        torch.linalg.vector_norm(tensors[3], p),
    ]
    torch.testing.assert_close(groups, torch.stack(expected))
    torch.testing.assert_close(total, torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), p))


def test_tensor_norms_mixed_dtypes_accumulate_in_float32() -> None:
    big_half = torch.full((4,), 60000.0, dtype=torch.float16)  # its 2-norm overflows fp16
    tensors = [big_half, torch.ones(9, dtype=torch.float64), torch.ones(4, dtype=torch.bfloat16)]
    norms = tensor_norms(tensors, 2.0)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.tensor([120000.0, 3.0, 2.0]))


def test_sparse_gradients_use_stored_values() -> None:
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([3.0, 4.0]), (5,))
    assert tensor_norms([sparse], 2.0).item() == pytest.approx(5.0)


def test_empty_group_has_zero_norm() -> None:
    out = combine_norms(torch.tensor([3.0, 4.0]), torch.tensor([0, 0]), 2, 2.0)
    torch.testing.assert_close(out, torch.tensor([5.0, 0.0]))


def test_power_means_are_size_independent() -> None:
    small, large = torch.full((10,), 0.5), torch.full((1000,), 0.5)
    norms = tensor_norms([small, large], 2.0)
    means = power_means(norms, torch.tensor([10, 1000]), 2.0)
    torch.testing.assert_close(means, torch.tensor([0.5, 0.5]))
    assert power_means(torch.tensor([2.0]), torch.tensor([100]), math.inf).item() == 2.0


@pytest.mark.parametrize("bad", [0.5, 0, -2, "fro", "two", float("nan"), True])
def test_validate_norm_type_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="`norm_type`"):
        validate_norm_type(bad)  # type: ignore[arg-type]


def test_validate_norm_type_accepts() -> None:
    assert validate_norm_type("inf") == math.inf
    assert validate_norm_type(float("inf")) == math.inf
    assert validate_norm_type(1) == 1.0


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_empty_tensors_have_zero_norm(p: float) -> None:
    norms = tensor_norms([torch.ones(4), torch.empty(0), torch.full((1,), 3.0)], p)
    torch.testing.assert_close(norms, torch.tensor([2.0 if p == 2.0 else 1.0, 0.0, 3.0]))
