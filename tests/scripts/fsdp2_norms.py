"""2-process FSDP2 (fully_shard, gloo, CPU): per-layer norms from local shards equal the full gradients' norms.

Lightning's FSDP strategies require a GPU, so this drives torch's FSDP2 directly through the same code path the
callbacks use (OptimizerParams.of(sharded=True), StepGradients.param_norms and ParamGroups.combine).
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
from tests.distributed import report


def run(rank: int, out_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # odd sizes so that shards are uneven, and one layer (3 rows) leaves rank 1 a short shard
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.ReLU(), nn.Linear(3, 1))
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 5) * (rank + 1)).pow(2).sum().backward()

    index = OptimizerParams.of(model, optimizer, sharded=True)
    groups = index.grouping("module")
    step = StepGradients(optimizer, index)
    result = {"groups": groups.group_names, "numels": groups.group_numels.tolist()}
    for p_name, p in (("2", 2.0), ("inf", math.inf), ("1", 1.0)):
        result[f"sharded_{p_name}"] = groups.combine(step.param_norms(p), p).tolist()
        full = {}
        for name, param in model.named_parameters():
            full.setdefault(name.rpartition(".")[0], []).append(param.grad.full_tensor().flatten())
        result[f"full_{p_name}"] = [float(torch.linalg.vector_norm(torch.cat(full[g]), p)) for g in groups.group_names]
    report(out_dir, rank, result)
    # Teardown: both ranks finish their collectives before the group goes, and the worker leaves without interpreter
    # finalization, where gloo's threads can still hold FSDP2's DTensors and abort (SIGABRT, seen once on CI).
    dist.barrier()
    del model, optimizer, step, index
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(run, args=(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "29561"), nprocs=2)
