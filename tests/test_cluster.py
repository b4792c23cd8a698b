"""Cluster: presets, local clusters, JSON round-trip, and which link a group of ranks uses."""
import dataclasses

import pytest

from pcompile import Cluster, Device, NodeGroup, PcompileError

GB = 1024**3


@pytest.mark.parametrize("name,devices,per_node,nodes,device,peak", [
    ("8xA100-80GB", 8, 8, 1, "A100-80GB", 312e12),
    ("8xH100-80GB", 8, 8, 1, "H100-80GB", 989e12),
    ("2x8xA100-80GB", 16, 8, 2, "A100-80GB", 312e12),
])
def test_presets(name, devices, per_node, nodes, device, peak):
    c = Cluster.preset(name)
    assert (c.name, c.num_devices, c.devices_per_node, c.num_nodes) == (name, devices, per_node, nodes)
    assert c.is_homogeneous and c.backend == "nccl"
    d = c.device_of(devices - 1)
    assert d.name == device and d.memory_bytes == 80 * GB
    # datasheet dense peak times a stated efficiency below 1
    assert 0.3 * peak < d.peak_flops <= peak
    assert c.intra_node_bandwidth > c.inter_node_bandwidth > 0


def test_h100_is_faster_than_a100():
    a, h = Cluster.preset("8xA100-80GB"), Cluster.preset("8xH100-80GB")
    assert h.min_device().peak_flops > a.min_device().peak_flops
    assert h.intra_node_bandwidth >= a.intra_node_bandwidth


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(PcompileError, match="unknown cluster preset '9xA100'") as info:
        Cluster.preset("9xA100")
    assert "8xA100-80GB" in info.value.fix


def test_local_cluster_on_this_machine():
    c = Cluster.local(4)
    assert c.num_devices == 4 and c.num_nodes == 1 and c.devices_per_node == 4
    assert c.backend in ("gloo", "nccl")
    assert Cluster.local(2, memory_bytes=3 * GB).min_device().memory_bytes == 3 * GB
    assert Cluster.local(1).num_devices == 1


@pytest.mark.parametrize("cluster", [Cluster.preset("8xA100-80GB"), Cluster.preset("2x8xA100-80GB"),
                                     Cluster.preset("8xH100-80GB"), Cluster.local(4)], ids=lambda c: c.name)
def test_json_round_trip(cluster):
    text = cluster.to_json()
    back = Cluster.from_json(text)
    assert back == cluster and back.to_json() == text
    assert hash(back) == hash(cluster)  # frozen: usable as a key


def test_heterogeneous_json_round_trip_and_min_device():
    v100 = Device("V100-32GB", 32 * GB, 87e12, 0.9e12)
    a100 = Device("A100-80GB", 80 * GB, 218e12, 2.0e12)
    c = Cluster((NodeGroup(a100, 1, 4), NodeGroup(v100, 1, 4)), 150e9, 5e-6, 12.5e9, 10e-6, "nccl", "mixed")
    assert Cluster.from_json(c.to_json()) == c
    assert not c.is_homogeneous and c.num_devices == 8
    assert c.device_of(3) == a100 and c.device_of(4) == v100
    slowest = c.min_device()
    assert slowest.memory_bytes == 32 * GB and slowest.peak_flops == 87e12


def test_malformed_json():
    with pytest.raises(PcompileError, match="malformed cluster JSON"):
        Cluster.from_json('{"node_groups": [{"num_nodes": 1}]}')


def test_link_chooses_intra_or_inter_node():
    c = Cluster.preset("2x8xA100-80GB")
    intra = (c.intra_node_bandwidth, c.intra_node_latency)
    inter = (c.inter_node_bandwidth, c.inter_node_latency)
    assert c.link(8) == intra  # ranks 0..7: one node
    assert c.link(2, stride=4) == intra  # ranks 0, 4
    assert c.link(4, stride=2) == intra  # ranks 0, 2, 4, 6
    assert c.link(16) == inter
    assert c.link(2, stride=8) == inter  # ranks 0 and 8: different nodes
    assert c.link(1) == intra
    assert Cluster.preset("8xA100-80GB").link(8) == intra


def test_with_memory_sets_every_device_budget():
    c = Cluster.preset("2x8xA100-80GB").with_memory(16 * GB)
    assert all(c.device_of(r).memory_bytes == 16 * GB for r in range(16))
    assert c.num_devices == 16


def test_cluster_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Cluster.local(2).backend = "nccl"


def test_a_slow_network_floors_every_transfer():
    from pcompile.cost.plan_price import p2p_link

    base = Cluster.local(4)
    slow = base.with_min_transfer(0.02)  # what latency.inject(20) does to the ranks' transfers
    groups = [[0, 1, 2, 3]]
    small, large = 4.0, 1e12
    assert slow.collective_time("all_reduce", small, groups) == 0.02 > base.collective_time("all_reduce", small, groups)
    assert slow.collective_time("all_reduce", large, groups) == base.collective_time("all_reduce", large, groups)
    assert slow.collective_time("all_reduce", small, [[0]]) == 0.0  # one rank: no transfer
    assert p2p_link(slow)[1] == 0.02
    assert Cluster.from_json(slow.to_json()) == slow
