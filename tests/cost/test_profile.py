"""The quick profile on 2 gloo ranks writes a JSON that Cluster.from_profile loads; the grouping,
node check, fits by link and GPU figures on CPU (tests/cost/test_profile_gpu.py: on a GPU)."""
from __future__ import annotations

import json
import math
import os

import pcompile
from pcompile.cost.profile import fit_alpha_beta, profile_cluster


def test_fit_alpha_beta_recovers_a_line():
    points = [(n, 2e-4 + n * 3e-9) for n in (1e3, 1e4, 1e5, 1e6)]
    latency, spb = fit_alpha_beta(points)
    assert abs(latency - 2e-4) < 1e-9 and abs(spb - 3e-9) < 1e-15


def test_fit_alpha_beta_ignores_points_timed_at_zero():
    # a loaded machine can time a collective at 0 (clamped): such points must not break the fit
    points = [(1.0, 0.0), (1e3, 1e-6 + 1e3 * 1e-9), (1e6, 1e-6 + 1e6 * 1e-9)]
    latency, spb = fit_alpha_beta(points)
    assert abs(latency - 1e-6) < 1e-9 and abs(spb - 1e-9) < 1e-12
    assert fit_alpha_beta([(1.0, 0.0)]) == (0.0, 0.0)


def test_quick_profile_round_trips(tmp_path):
    path = tmp_path / "cluster.json"
    cluster = profile_cluster(2, path, quick=True)
    assert pcompile.Cluster.from_profile(path) == cluster
    device = cluster.device_of(0)
    assert device.peak_flops > 0 and device.memory_bandwidth > 0 and len(device.matmul_curve) == 3
    ops = {(f.op, f.group_size) for f in cluster.collectives}
    assert {("all_reduce", 2), ("all_gather", 2), ("reduce_scatter", 2), ("send", 2)} <= ops
    assert all(f.latency >= 0 and f.seconds_per_byte >= 0 for f in cluster.collectives)
    assert 0.0 <= cluster.overlap <= 1.0
    assert device.gelu_rate > 0 and device.gelu_backward_rate > 0
    assert cluster.num_nodes == 1 and {f.link for f in cluster.collectives} == {"intra"}
    assert not device.matmul_curve_bf16  # quick on CPUs: fp32 alone


def test_collective_points_are_median_loop_less_median_burst():
    from pcompile.cost.profile import build_cluster

    ms = 1e-3
    # two ranks; per point (.., rank's difference, loop, burst): loops 3 and 4 ms on both ranks (in
    # step), bursts 1 and 2 ms (median 1.5): 1.5 ms at 1000 bytes, 2.5 ms at 2000 -> 0.5 ms + 1 us/byte
    def rank(burst):
        return dict(matmul_fp32=[(1e6, 1e9)], memory_bandwidth=1e10, op_overhead=(1e-5, 2e-5), overlap=0.5,
                    collectives=[("all_reduce", 2, 1000, 3 * ms - burst, 3 * ms, burst),
                                 ("all_reduce", 2, 2000, 4 * ms - burst, 4 * ms, burst)])
    cluster = build_cluster([rank(1 * ms), rank(2 * ms)], 2, "gloo", memory_bytes=2**30)
    fit, = [f for f in cluster.collectives if f.op == "all_reduce"]
    assert abs(fit.latency - 0.5 * ms) < 1e-9 and abs(fit.seconds_per_byte - 1e-6) < 1e-12
    # an older profile's 4-tuples: the slowest rank's figure
    old = [dict(rank(0), collectives=[("all_reduce", 2, 1000, t), ("all_reduce", 2, 2000, t + ms)])
           for t in (1 * ms, 1.5 * ms)]
    fit, = [f for f in build_cluster(old, 2, "gloo", memory_bytes=2**30).collectives if f.op == "all_reduce"]
    assert abs(fit.latency - 0.5 * ms) < 1e-9 and abs(fit.seconds_per_byte - 1e-6) < 1e-12


def test_link_groups_split_the_world_within_and_across_nodes():
    from pcompile.cost.profile import link_groups

    two_nodes = link_groups(8, 4)  # 2 nodes of 4
    assert two_nodes == {("intra", 2): [[0, 1], [2, 3], [4, 5], [6, 7]], ("intra", 4): [[0, 1, 2, 3], [4, 5, 6, 7]],
                         ("inter", 2): [[0, 4], [1, 5], [2, 6], [3, 7]]}
    assert set(link_groups(8, 8)) == {("intra", 2), ("intra", 4), ("intra", 8)}  # one node: nothing across
    four_nodes = link_groups(8, 2)
    assert four_nodes["inter", 2] == [[0, 2], [1, 3], [4, 6], [5, 7]]  # consecutive nodes, same local rank
    assert four_nodes["inter", 4] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert link_groups(6, 2)["inter", 3] == [[0, 2, 4], [1, 3, 5]]  # the node count, though no power of 2
    assert set(link_groups(3, 1)) == {("inter", 3)}  # a rank per node: no group inside one


def test_check_nodes_holds_local_world_size_against_the_hosts():
    import pytest

    from pcompile.cost.profile import check_nodes
    from pcompile.errors import PcompileError

    assert check_nodes(["a", "a", "b", "b"], 2) == 2 and check_nodes(["a"] * 4, 4) == 1
    for hosts, per_node in ((["a", "b", "a", "b"], 2),  # ranks not numbered node by node
                            (["a", "a", "a", "a"], 2),  # two "nodes" on one host
                            (["a", "a", "b", "b"], 4),  # LOCAL_WORLD_SIZE missing on a 2-host world
                            (["a", "a", "b"], 2)):  # the world no multiple of the node
        with pytest.raises(PcompileError, match="consecutive ranks per node"):
            check_nodes(hosts, per_node)


def _rank_measurements(**extra) -> dict:
    return {**dict(matmul_fp32=[(1e6, 1e9), (1e9, 2e9)], memory_bandwidth=1e10, op_overhead=(1e-5, 2e-5),
                   overlap=0.5, collectives=[]), **extra}


def test_build_cluster_fits_intra_and_inter_node_links_apart():
    from pcompile.cost.profile import build_cluster

    us = 1e-6
    # 2 nodes of 2 ranks; all-reduce on 2 ranks (a ring of 2 steps): inside a node 20 us + 1 ns/byte
    # (-> 10 us, 1 GB/s per step); across nodes 200 us + 10 ns/byte (-> 100 us, 0.1 GB/s)
    points = [(op, 2, n, 0.0, latency + n * spb, 0.0, link)
              for op in ("all_reduce", "send") for link, latency, spb in (("intra", 20 * us, 1e-9),
                                                                          ("inter", 200 * us, 1e-8))
              for n in (1000, 100000)]
    rank = _rank_measurements(collectives=points, ranks_per_node=2)
    cluster = build_cluster([rank] * 4, 4, "gloo", memory_bytes=2**30)
    assert (cluster.num_nodes, cluster.devices_per_node) == (2, 2)
    fits = {(f.op, f.link): f for f in cluster.collectives}
    assert set(fits) == {(op, link) for op in ("all_reduce", "send") for link in ("intra", "inter")}
    assert math.isclose(fits["send", "inter"].latency, 200 * us)
    assert math.isclose(fits["send", "intra"].latency, 20 * us)
    assert math.isclose(cluster.intra_node_latency, 10 * us) and math.isclose(cluster.intra_node_bandwidth, 1e9)
    assert math.isclose(cluster.inter_node_latency, 100 * us) and math.isclose(cluster.inter_node_bandwidth, 1e8)
    assert math.isclose(cluster.collective_time("all_reduce", 1000, [[0, 2], [1, 3]]), 210 * us)  # the inter fit
    assert pcompile.Cluster.from_json(cluster.to_json()) == cluster
    one_node = build_cluster([_rank_measurements(collectives=[p for p in points if p[-1] == "intra"])] * 4, 4,
                             "gloo", memory_bytes=2**30)
    assert one_node.num_nodes == 1 and one_node.inter_node_bandwidth == one_node.intra_node_bandwidth


def test_build_cluster_takes_a_gpu_s_name_memory_and_bf16_peak():
    from pcompile.cost.profile import build_cluster

    def rank(memory):
        return _rank_measurements(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", memory_bytes=memory,
                                  matmul_bf16=[(1e6, 4e9), (1e9, 9e9)])
    cluster = build_cluster([rank(70 * 2**30), rank(60 * 2**30)], 2, "nccl")
    device = cluster.device_of(0)
    assert device.name == "NVIDIA H100 80GB HBM3" and device.memory_bytes == 60 * 2**30  # the tightest rank's
    assert device.matmul_curve_bf16 == ((1e6, 4e9), (1e9, 9e9)) and device.peak_flops == 9e9  # GPUs train in bf16
    assert pcompile.Cluster.from_json(cluster.to_json()) == cluster
    cpu = build_cluster([dict(rank(2**30), device_type="cpu")] * 2, 2, "gloo").device_of(0)
    assert cpu.peak_flops == 2e9 and cpu.matmul_curve_bf16  # a CPU trains in fp32; bf16 kept when measured


def test_cuda_memory_budget_leaves_room_outside_the_allocator():
    from pcompile.cost.profile import CUDA_FRAGMENTATION, CUDA_RESERVE_BYTES, cuda_memory_budget

    gib = 2**30
    # 80 GiB, 1 GiB outside PyTorch (context, NCCL), 9 GiB held by its cache (reusable), 70 GiB free
    budget = cuda_memory_budget(80 * gib, 70 * gib, 9 * gib)
    assert budget == int((79 * gib - CUDA_RESERVE_BYTES) * (1 - CUDA_FRAGMENTATION))
    assert 70 * gib < budget < 79 * gib


def _profile_two_emulated_nodes(path):
    """On 4 launched ranks posing as 2 hosts of 2: (profile_cluster in the running group, the
    ranks this one sent to), every timing replaced by one call of the timed function (run on
    its real groups) and 1 ms."""
    import socket

    import torch.distributed as dist

    from pcompile.cost import profile

    rank = dist.get_rank()
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    socket.gethostname = lambda: f"node{rank // 2}"
    profile._timed = profile._shared_timed = lambda fn, device, seconds=0.0: (fn(), 1e-3)[1]
    peers, send = set(), dist.send
    dist.send = lambda tensor, dst, **kwargs: (peers.add(dst), send(tensor, dst, **kwargs))[1]
    return profile.profile_cluster(path=path, quick=True), peers


def test_profile_in_a_process_group_spanning_nodes(tmp_path):
    path = tmp_path / "nodes.json"
    clusters, peers = zip(*pcompile.launch(_profile_two_emulated_nodes, 4, str(path), timeout=120))
    cluster = clusters[0]
    assert list(peers) == [{r ^ 1, r ^ 2} for r in range(4)]  # its node's other rank, the other node's same one
    assert all(c == cluster for c in clusters) and pcompile.Cluster.from_profile(path) == cluster
    assert (cluster.num_nodes, cluster.devices_per_node, cluster.backend) == (2, 2, "gloo")
    assert {(f.op, f.group_size, f.link) for f in cluster.collectives} == {
        (op, 2, link) for op in ("all_reduce", "all_gather", "reduce_scatter", "send") for link in ("intra", "inter")}
    with open(path) as f:
        measured = json.load(f)["measurements"]
    assert [r["ranks_per_node"] for r in measured] == [2] * 4 and all(r["wakeup"] for r in measured)
