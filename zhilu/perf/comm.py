"""Alpha-beta cost of collectives and point-to-point transfers on a two-tier cluster.

A ring collective among ``n`` devices takes ``n - 1`` steps (all-reduce: ``2 (n - 1)``) of
latency ``alpha`` and puts ``(n - 1) / n`` of the tensor on every device's link (all-reduce:
twice that). Inside a node the link is the node's fabric (NVLink, shared memory); a group
that spans nodes is limited by the network, where NCCL runs one ring per NIC, so a group
with ``k`` members in each node moves data at ``k`` times one device's network bandwidth
(capped by the node fabric).
"""

from __future__ import annotations

from zhilu.perf.device import Cluster

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")


def collective_seconds(kind: str, nbytes: float, n: int, per_node: int, cluster: Cluster) -> float:
    """Time of a ring ``kind`` over ``n`` devices (``per_node`` in each node) of a tensor of ``nbytes``.

    ``nbytes`` is the full (unsharded) tensor: the input of an all-reduce or reduce-scatter,
    the output of an all-gather.
    """
    if n <= 1 or nbytes <= 0:
        return 0.0
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective {kind!r}; valid: {', '.join(COLLECTIVES)}")
    per_node = max(1, min(per_node, n))
    if per_node == n:
        alpha, bandwidth = cluster.intra.latency_us, cluster.intra.bandwidth_gbps
    else:
        alpha = cluster.inter.latency_us
        bandwidth = min(cluster.intra.bandwidth_gbps, per_node * cluster.inter.bandwidth_gbps)
    passes = 2 if kind == "all_reduce" else 1
    return passes * ((n - 1) * alpha * 1e-6 + (n - 1) / n * nbytes / (bandwidth * 1e9))


def p2p_seconds(nbytes: float, across_nodes: bool, cluster: Cluster) -> float:
    """Time of one point-to-point send of ``nbytes`` (pipeline stages)."""
    link = cluster.inter if across_nodes else cluster.intra
    return link.latency_us * 1e-6 + nbytes / (link.bandwidth_gbps * 1e9)


def members_per_node(tp: int, dp: int, devices_per_node: int) -> tuple[int, bool]:
    """How many devices of one data-parallel group share a node, and whether pipeline stages span nodes.

    Ranks are laid out tensor-parallel innermost, then data-parallel, then pipeline
    (Megatron-LM's and torchtitan's order): a tensor-parallel group fills part of a node.
    """
    dp_per_node = max(1, min(dp, devices_per_node // tp))
    return dp_per_node, tp * dp >= devices_per_node
