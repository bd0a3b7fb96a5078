"""Norms of sharded parameters on 2-D meshes: each parameter reduced over the mesh dimensions it is sharded along."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.distributed import run_ddp_script

CASES = ("hsdp", "fsdp_tp", "fsdp", "partial")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The four ranks' reports of tests/scripts/mesh_norms.py (one 4-process launch for every case)."""
    out = tmp_path_factory.mktemp("mesh")
    run_ddp_script("mesh_norms.py", out, _free_port(), timeout=240)  # checks ranks 0 and 1 reported
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("case", CASES)
def test_norms_on_a_2x2_mesh_equal_the_full_gradients(ranks: list[dict[str, Any]], case: str) -> None:
    """HSDP (replicated along one dimension), FSDP x TP (a layer replicated across tp without a mesh dimension for
    it), 1-D FSDP over 4 ranks, and gradients holding summands (Partial): per-layer norms for p = 2, inf, 1, the
    global norm, non-zero counts, layer sizes, weight norms and update ratios are the full tensors', on every rank."""
    for rank in ranks:
        found = rank[case]
        assert found["groups"] == ["0", "2", "4"]
        assert found["numels"] == found["full_numels"] == [5 * 8 + 8, 8 * 3 + 3, 3 + 1]  # not shards, not replicas
        for p in ("2", "inf", "1"):
            assert found[f"sharded_{p}"] == pytest.approx(found[f"full_{p}"], rel=1e-5)
        assert found["global"] == pytest.approx(found["full_global"], rel=1e-5)
        assert found["nonzero"] == found["full_nonzero"]
        assert found["weights"] == pytest.approx(found["full_weights"], rel=1e-5)
        assert found["update_ratios"] == pytest.approx(found["full_update_ratios"], rel=1e-4)
    assert all(rank[case]["sharded_2"] == ranks[0][case]["sharded_2"] for rank in ranks)  # the same on every rank


def test_one_collective_per_sharded_mesh_dimension(ranks: list[dict[str, Any]]) -> None:
    """One all-reduce per distinct mesh-dimension group a parameter is sharded along, never one per parameter:
    HSDP and 1-D FSDP reduce once, FSDP x TP twice (dp and tp), replicated weights with Partial gradients not at all
    (their summands are added in one all-reduce of their own)."""
    expected = {"hsdp": 1, "fsdp_tp": 2, "fsdp": 1, "partial": 0}
    for rank in ranks:
        assert {case: rank[case]["collectives"] for case in CASES} == expected


def test_gradient_norm_logger_under_model_parallel_hsdp_logs_the_full_gradient_norms(tmp_path: Path) -> None:
    """A real ModelParallelStrategy fit, 2 ranks on gloo, ``fully_shard`` on its 2x1 mesh (replicated along the
    data-parallel dimension): the norms GradientNormLogger writes to TensorBoard are ``p.grad.full_tensor()``'s,
    not sqrt(2) times them."""
    from tests import tensorboard_events as tb

    rank0, rank1 = run_ddp_script("hsdp_logger.py", tmp_path)
    assert rank0["full"] == rank1["full"]
    events = tb.scalars(tmp_path / "tb" / "version_0")
    for layer in ("net.0", "net.2", "net.4"):
        logged = dict(events[f"gradwatch/grad_norm/{layer}"])
        assert sorted(logged) == [0, 1, 2, 3]
        for step, value in logged.items():
            assert value == pytest.approx(rank0["full"][str(step)][layer], rel=1e-5)
