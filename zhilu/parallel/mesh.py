"""Process group and DeviceMesh for a Plan.

Each process reads its place from the environment that torchrun (or zhilu's own local
launch, which is torch elastic too) sets: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT. Without them, the job is one process and no group is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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
    mesh: DeviceMesh | None  # dimensions "pp", "dp", "tp" (outermost to innermost)
    # hybrid model averaging (avg_groups): "sync", the replicas of this rank's DDP group, and
    # "average", the ranks at the same place in the other groups
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rank_in(self, dim: str) -> int:
        return self.mesh[dim].get_local_rank() if self.mesh is not None else 0

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group of mesh dimension ``dim``, or None when it has one rank."""
        if self.mesh is None or self.mesh[dim].size() == 1:
            return None
        return self.mesh[dim].get_group()

    @property
    def dp_rank(self) -> int:
        return self.local_rank_in("dp")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.group("dp")


def init_parallel(plan: Plan, device_type: str) -> ParallelEnv:
    """Join the process group (gloo on CPU, NCCL on CUDA) and build the plan's mesh."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = join_group(device_type)
    mesh = None
    if world > 1:
        # tp innermost: its ranks are neighbours, on one node when the launch fills nodes in order.
        mesh = init_device_mesh(device_type, (plan.pp, plan.dp, plan.tp), mesh_dim_names=("pp", "dp", "tp"))
    groups = {}
    if plan.avg_groups and world > 1:  # dp only (validated): dp ranks are the global ranks
        size = plan.dp // plan.avg_groups
        sync, _ = dist.new_subgroups_by_enumeration([list(range(g * size, (g + 1) * size))
                                                     for g in range(plan.avg_groups)])
        average, _ = dist.new_subgroups_by_enumeration([list(range(i, plan.dp, size)) for i in range(size)])
        groups = {"sync": sync, "average": average}
    return ParallelEnv(rank, world, local_rank, local_world, device, mesh, groups)


def join_group(device_type: str) -> torch.device:
    """This process's device (its GPU, or its share of the CPU cores), and the process group
    (gloo on CPU, NCCL on CUDA) when there is more than one process."""
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                device_id=device if device_type == "cuda" else None)
    return device


def share_cores(local_world: int) -> None:
    """On CPU, give each of the ``local_world`` processes of this host its share of the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_world))


def shutdown_parallel() -> None:
    """Leave the process group; the barrier first keeps FSDP2 on gloo from aborting at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
