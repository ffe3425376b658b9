"""Process group and DeviceMesh for a Plan.

Each process reads its place from the environment that torchrun (or zhilu's own local
launch, which is torch elastic too) sets: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT. Without them, the job is one process and no group is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from zhilu.plan import Plan


@dataclass
class ParallelEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    mesh: DeviceMesh | None  # named dimensions: "dp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["dp"].get_group() if self.mesh is not None else None


def init_parallel(plan: Plan, device_type: str) -> ParallelEnv:
    """Join the process group (gloo on CPU, NCCL on CUDA) and build the plan's mesh."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_world))
    mesh = None
    if world > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device_type == "cuda" else None)
        mesh = init_device_mesh(device_type, (plan.dp,), mesh_dim_names=("dp",))
    return ParallelEnv(rank, world, local_rank, local_world, device, mesh)


def shutdown_parallel() -> None:
    """Leave the process group; the barrier first keeps FSDP2 on gloo from aborting at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
