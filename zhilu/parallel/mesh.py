"""Process group and DeviceMesh for a Plan.

Each process reads its place from the environment that torchrun (or zhilu's own local
launch, which is torch elastic too) sets: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT. Without them, the job is one process and no group is made.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
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


def init_parallel(plan: Plan, device_type: str, timeout_s: float | None = None) -> ParallelEnv:
    """Join the process group (gloo on CPU, NCCL on CUDA) and build the plan's mesh.

    ``timeout_s``: how long a collective waits for the other ranks before it fails (torch's
    default otherwise: 10 minutes for NCCL, 30 for gloo)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = join_group(device_type, timeout_s)
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


def join_group(device_type: str, timeout_s: float | None = None) -> torch.device:
    """This process's device (its GPU, or its share of the CPU cores), and the process group
    (gloo on CPU, NCCL on CUDA) when there is more than one process.

    Under zhilu's own launcher rank 0's store listens on 127.0.0.1 only (torch's own would
    listen on every interface); see :func:`_store`."""
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=_store(world, timeout),
                                rank=int(os.environ["RANK"]), world_size=world, timeout=timeout,
                                device_id=device if device_type == "cuda" else None)
    return device


_LISTENERS: list[socket.socket] = []


def _store(world: int, timeout: timedelta | None) -> dist.Store | None:
    """The store the group meets in, where zhilu must make it; None: torch's, from MASTER_ADDR and
    MASTER_PORT.

    * Under zhilu's launcher: rank 0's, its server bound to 127.0.0.1.
    * Under torchrun, whose agent keeps one store across restarts: a view of it with a prefix
      per restart, so a restarted group never reads the addresses of the one before
      (pytorch/pytorch#135712)."""
    host = os.environ.get("MASTER_ADDR", "")
    port = int(os.environ.get("ZHILU_STORE_PORT") or os.environ.get("MASTER_PORT", 0))  # zhilu.launch.local
    wait = timeout or timedelta(minutes=5)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and port:
        agent = dist.TCPStore(host, port, world, False, wait)
        return dist.PrefixStore(f"zhilu/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
    if os.environ.get("ZHILU_LOCAL_LAUNCH") != "1" or host not in ("127.0.0.1", "localhost") or not port:
        return None
    if int(os.environ["RANK"]) != 0:
        return dist.TCPStore("127.0.0.1", port, world, False, wait)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(world)
    store = dist.TCPStore("127.0.0.1", port, world, True, wait, wait_for_workers=False,
                          master_listen_fd=listener.fileno())
    _LISTENERS.append(listener)  # the store serves on this socket's descriptor: keep it open
    return store


def share_cores(local_world: int) -> None:
    """On CPU, give each of the ``local_world`` processes of this host its share of the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_world))


def shutdown_parallel() -> None:
    """Leave the process group; the barrier first keeps FSDP2 on gloo from aborting at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
