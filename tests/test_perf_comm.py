"""Alpha-beta collectives: ring times by hand, and the tier a group's traffic crosses."""

import pytest

from zhilu.hardware import PRESETS
from zhilu.perf.comm import collective_seconds, members_per_node, p2p_seconds

A100 = PRESETS["a100-80gb"]  # NVLink: 1 us a step, 205 GB/s; network: 5 us a step, 23 GB/s per GPU
GB = 1e9


def test_ring_all_reduce_inside_a_node():
    # 2 (n - 1) steps of latency and 2 (n - 1) / n of the tensor over the link
    expected = 2 * (7 * 1e-6 + 7 / 8 * GB / 205e9)
    assert collective_seconds("all_reduce", GB, 8, 8, A100) == pytest.approx(expected)


def test_reduce_scatter_and_all_gather_are_half_an_all_reduce():
    ar = collective_seconds("all_reduce", GB, 8, 8, A100)
    assert collective_seconds("reduce_scatter", GB, 8, 8, A100) == pytest.approx(ar / 2)
    assert collective_seconds("all_gather", GB, 8, 8, A100) == pytest.approx(ar / 2)


def test_a_group_spanning_nodes_runs_one_ring_per_nic():
    c = A100.sized(16)
    # 16 devices, 8 in each node: 8 NICs of 23 GB/s, capped by NVLink's 205
    expected = 15 * 5e-6 + 15 / 16 * GB / (8 * 23e9)
    assert collective_seconds("reduce_scatter", GB, 16, 8, c) == pytest.approx(expected)
    # one member per node: a single NIC
    assert collective_seconds("all_gather", GB, 2, 1, c) == pytest.approx(5e-6 + GB / 2 / 23e9)


def test_a_single_device_does_not_communicate():
    assert collective_seconds("all_reduce", GB, 1, 1, A100) == 0.0


def test_point_to_point():
    assert p2p_seconds(GB, across_nodes=True, cluster=A100) == pytest.approx(5e-6 + GB / 23e9)
    assert p2p_seconds(GB, across_nodes=False, cluster=A100) == pytest.approx(1e-6 + GB / 205e9)


@pytest.mark.parametrize("tp,dp,per_node,across", [(8, 4, 1, True), (2, 8, 4, True), (1, 4, 4, False),
                                                    (4, 2, 2, True), (2, 2, 2, False)])
def test_groups_are_laid_out_tensor_parallel_innermost(tp, dp, per_node, across):
    assert members_per_node(tp, dp, 8) == (per_node, across)
