"""4-process 2-D meshes (gloo, CPU): norms from local shards equal the full gradients' norms on every layout.

Drives torch's FSDP2 and tensor parallelism directly through the code path the callbacks use
(OptimizerParams.of(sharded=True), StepGradients, ParamGroups.combine, UpdateTracker) and compares each value with
the one computed from ``full_tensor()``:

- ``hsdp``: ``fully_shard`` on a 2x2 (replicate, shard) mesh: each parameter replicated along dim 0;
- ``fsdp_tp``: tensor parallelism on the 2-rank ``tp`` dimension, FSDP2 on the 2-rank ``dp`` one, and a last layer
  that is FSDP-only (its mesh is the ``dp`` dimension alone: replicated across ``tp`` without saying so);
- ``fsdp``: 1-D FSDP2 over the 4 ranks (the plain case stays exact);
- ``partial``: a replicated parameter whose gradient holds summands (``Partial``), as tensor parallelism's
  replicated layers can leave it.
"""

import math
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_gradwatch._params import OptimizerParams
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch.gradients._update_ratio import UpdateTracker
from tests.distributed import report

WORLD = 4


def _model() -> nn.Sequential:
    torch.manual_seed(0)  # the same weights on every rank
    # odd sizes so that shards are uneven; the middle layer's 3 rows leave a rank of a 2-way shard a short shard
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 1))


def _layout(name: str, rank: int) -> tuple[nn.Module, int]:
    """The model laid out on the mesh, and the index of the batch this rank sees (ranks of one replica alike)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate

    model = _model()
    if name == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for layer in (model[0], model[2], model[4], model):
            fully_shard(layer, mesh=mesh)
        return model, rank  # every rank is a data-parallel rank
    if name == "fsdp_tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in (model[0], model[2], model[4], model):
            fully_shard(layer, mesh=mesh["dp"])
        return model, mesh.get_coordinate()[0]  # the tp ranks of one dp rank see the same batch
    if name == "fsdp":
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model[0], model[2], model[4], model):
            fully_shard(layer, mesh=mesh)
        return model, rank
    mesh = init_device_mesh("cpu", (WORLD,))  # "partial": replicated weights; gradients set below
    for layer in (model[0], model[2], model[4]):
        for pname, p in list(layer.named_parameters()):
            setattr(layer, pname, nn.Parameter(DTensor.from_local(p.detach().clone(), mesh, [Replicate()])))
    return model, rank


def _partial_grads(model: nn.Module, rank: int) -> None:
    """The first layer's gradients hold summands (Partial: each rank's local one is its part of the sum), the
    others are the same on every rank (Replicate)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mine = torch.Generator().manual_seed(100 + rank)
    shared = torch.Generator().manual_seed(7)
    for i, layer in enumerate((model[0], model[2], model[4])):
        for p in layer.parameters():
            if i == 0:
                local = torch.randn(p.shape, generator=mine)
                local[0] = 0.0  # a row that is zero in every summand: the nonzero count is the sum's
                p.grad = DTensor.from_local(local, p.device_mesh, [Partial()], run_check=False)
            else:
                p.grad = DTensor.from_local(torch.randn(p.shape, generator=shared), p.device_mesh, [Replicate()])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _case(name: str, rank: int) -> dict:
    model, batch = _layout(name, rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if name == "partial":
        _partial_grads(model, rank)
    else:
        data = torch.randn(4, 8, 5, generator=torch.Generator().manual_seed(1))
        model(data[batch] * (batch + 1)).pow(2).sum().backward()

    index = OptimizerParams.of(model, optimizer, sharded=True)
    groups = index.grouping("module")
    step = StepGradients(optimizer, index)
    layers: dict[str, list[torch.nn.Parameter]] = {}
    for pname, param in model.named_parameters():
        layers.setdefault(pname.rpartition(".")[0], []).append(param)

    def full_norms(tensors: dict[str, list[torch.Tensor]], p: float) -> list[float]:
        return [
            float(torch.linalg.vector_norm(torch.cat([_full(t).flatten() for t in tensors[g]]), p))
            for g in groups.group_names
        ]

    grads = {g: [q.grad for q in ps] for g, ps in layers.items()}
    weights = {g: [q.detach() for q in ps] for g, ps in layers.items()}
    result: dict = {
        "groups": groups.group_names,
        "numels": groups.group_numels.tolist(),
        "full_numels": [sum(q.numel() for q in layers[g]) for g in groups.group_names],
        "collectives": len(index.reduction.steps),
    }
    for p_name, p in (("2", 2.0), ("inf", math.inf), ("1", 1.0)):
        result[f"sharded_{p_name}"] = groups.combine(step.param_norms(p), p).tolist()
        result[f"full_{p_name}"] = full_norms(grads, p)
    result["global"] = float(step.global_norm(2.0))
    result["full_global"] = float(torch.linalg.vector_norm(torch.tensor(result["full_2"])))
    result["nonzero"] = groups.combine(step.nonzero_counts(), 1.0).tolist()
    result["full_nonzero"] = [float(sum(int((_full(t) != 0).sum()) for t in grads[g])) for g in groups.group_names]
    result["weights"] = groups.combine(step.weight_norms(2.0), 2.0).tolist()
    result["full_weights"] = full_norms(weights, 2.0)

    tracker = UpdateTracker()
    tracker.snapshot(step)
    before = {g: [_full(t).clone() for t in ts] for g, ts in weights.items()}
    optimizer.step()
    ratios = tracker.ratios(StepGradients(optimizer, index), groups)
    result["update_ratios"] = ratios.tolist() if ratios is not None else None
    after = {g: [_full(q.detach()) for q in ps] for g, ps in layers.items()}
    result["full_update_ratios"] = [
        float(
            torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(after[g], before[g], strict=True)]))
            / torch.linalg.vector_norm(torch.cat([b.flatten() for b in before[g]]))
        )
        for g in groups.group_names
    ]
    dist.barrier()
    return result


def run(rank: int, out_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cases = os.environ.get("MESH_CASES", "hsdp,fsdp_tp,fsdp,partial").split(",")
    results = {}
    for name in cases:
        print(f"[{rank}] {name}", file=sys.stderr, flush=True)
        results[name] = _case(name, rank)
    report(out_dir, rank, results)
    # Teardown (as fsdp2_norms.py): every rank done with its collectives before the group goes, and an exit
    # without interpreter finalization, where gloo's threads can still hold DTensors and abort
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(run, args=(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "29571"), nprocs=WORLD)
