"""Heterogeneous clusters: a stage is costed on the devices it lands on, never on an average."""
from __future__ import annotations

import json

import numpy as np

from pcompile.cluster import Cluster, CollectiveFit, gpu_reserve
from pcompile.cost.pricing import CostOptions, cost_table, estimate_uniform, stage_memory_budget
from pcompile.plan import Strategy

MIXED = "4xA100-80GB+4xV100-32GB"
GB = 2**30
A100_BUDGET, V100_BUDGET = 80 * GB - gpu_reserve(80 * GB), 32 * GB - gpu_reserve(32 * GB)  # less the reserve


def test_same_layer_costs_more_on_the_slower_device(gpt_ir):
    ir, _ = gpt_ir
    cluster = Cluster.preset(MIXED)
    strategies = [Strategy(dp=4), Strategy(dp=2, tp=2), Strategy(dp=1, tp=4, sp=True)]
    a100 = cost_table(ir, cluster, 4, 64, strategies, CostOptions(first_rank=0))
    v100 = cost_table(ir, cluster, 4, 64, strategies, CostOptions(first_rank=4))
    blocks = [i for i, layer in enumerate(a100.layers) if layer.startswith("blocks.")]
    assert (v100.fwd_time[blocks] > a100.fwd_time[blocks]).all()
    assert (v100.bwd_time[blocks] > a100.bwd_time[blocks]).all()
    assert np.array_equal(v100.state_memory, a100.state_memory)  # bytes per device do not depend on the device
    # a stage spanning both kinds waits for the V100s
    both = cost_table(ir, cluster, 8, 64, [Strategy(dp=8)], CostOptions(first_rank=0))
    alone = cost_table(ir, cluster, 4, 32, [Strategy(dp=4)], CostOptions(first_rank=4))
    assert np.allclose(both.fwd_time[blocks], alone.fwd_time[blocks])


def test_a_stage_on_the_32gb_devices_is_charged_against_32gb(gpt_ir):
    ir, _ = gpt_ir
    cluster = Cluster.preset(MIXED)
    assert stage_memory_budget(cluster, 0, 4) == A100_BUDGET
    assert stage_memory_budget(cluster, 4, 4) == V100_BUDGET
    assert stage_memory_budget(cluster, 0, 8) == V100_BUDGET
    assert estimate_uniform(ir, cluster, Strategy(dp=4), options=CostOptions(first_rank=4)).memory_budget == V100_BUDGET
    assert estimate_uniform(ir, cluster, Strategy(dp=4)).memory_budget == A100_BUDGET


def test_measured_collective_fits_win_and_round_trip_json(tmp_path):
    base = Cluster.local(4)
    fit = CollectiveFit("all_reduce", 2, "intra", latency=1e-3, seconds_per_byte=1e-9)
    cluster = Cluster(base.node_groups, base.intra_node_bandwidth, base.intra_node_latency,
                      base.inter_node_bandwidth, base.inter_node_latency, "gloo", "fitted", (fit,), 0.3)
    assert cluster.collective_time("all_reduce", 1e6, [[0, 1], [2, 3]]) == 1e-3 + 1e6 * 1e-9
    assert cluster.collective_time("all_reduce", 1e6, [[0, 1, 2, 3]]) == base.collective_time(
        "all_reduce", 1e6, [[0, 1, 2, 3]])  # no fit for 4 ranks: the ring on the link
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"cluster": cluster.to_dict()}))
    assert Cluster.from_profile(path) == cluster
