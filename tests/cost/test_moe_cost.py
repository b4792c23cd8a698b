"""The price of MoE experts under expert parallelism (pcompile.cost.moe): the layer's numbers
read from the built-in MoE GPT's IR, the ep degrees a search may offer, the all-to-all's
alpha-beta (or a measured fit), expert FLOPs by top-k / E under ep (the dense form's E
without), and the experts' memory per rank (E/ep held) and gradient sync (over dp/ep ranks)."""
import dataclasses

import pytest
import torch

import pcompile
from pcompile.cluster import CollectiveFit
from pcompile.cost.moe import MoEShape, all_to_all_time, ep_degrees, expert_cost, moe_shapes
from pcompile.errors import PcompileError
from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs

CFG = MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, hidden=16, num_heads=2, seq_len=8, vocab_size=32)
SHAPE = MoEShape("blocks.0", num_experts=8, top_k=2, tokens=4096, hidden=1024, expert_params=8_000_000,
                 flops_per_token=16e6)


def test_shapes_read_from_the_ir():
    torch.manual_seed(0)
    ir = pcompile.compile(MoEGPT(CFG), pcompile.Cluster.local(2), moe_gpt_inputs(CFG, 4),
                          plan=pcompile.Plan.uniform(dp=2), stop_after="layers")
    shapes = moe_shapes(ir)
    h, f = CFG.hidden, CFG.hidden * CFG.mlp_ratio
    assert shapes == [MoEShape(layer, 4, 2, 4 * 8, h, 2 * h * f + f + h, 2.0 * 2 * h * f)
                      for layer in ("blocks.0", "blocks.1")]


def test_shapes_of_hf_mixtral():
    from tests.distributed.ranks_statistics import batch, mixtral

    torch.manual_seed(0)
    ir = pcompile.compile(mixtral(), pcompile.Cluster.local(2), batch(0), plan=pcompile.Plan.uniform(dp=2),
                          stop_after="layers")
    first = moe_shapes(ir)[0]
    per_expert = 2 * 64 * 32 + 32 * 64  # gate_up (2I, H) and down (H, I) of one expert
    assert (first.num_experts, first.top_k, first.tokens, first.hidden) == (4, 2, 64, 32)
    assert (first.expert_params, first.flops_per_token, first.dense) == (per_expert, 2.0 * per_expert, False)
    cluster = pcompile.Cluster.preset("8xA100-80GB")
    plain = expert_cost(first, cluster, dp=4, ep=1)
    assert plain.compute == pytest.approx(expert_cost(first, cluster, dp=4, ep=2).compute)  # dropless already


def test_ep_degrees_divide_experts_and_dp():
    assert ep_degrees(8, 8) == [2, 4, 8] and ep_degrees(4, 8) == [2, 4] and ep_degrees(6, 4) == [2]
    assert ep_degrees(3, 4) == []


def test_all_to_all_alpha_beta_and_measured_fit():
    cluster = pcompile.Cluster.preset("8xA100-80GB")
    bw, alpha = cluster.intra_node_bandwidth, cluster.intra_node_latency
    assert all_to_all_time(cluster, 1e6, range(4)) == pytest.approx(3 * alpha + 0.75 * 1e6 / bw)
    assert all_to_all_time(cluster, 1e6, range(1)) == 0.0
    measured = dataclasses.replace(cluster, collectives=(CollectiveFit("all_to_all", 4, "intra", 1e-3, 1e-9),))
    assert all_to_all_time(measured, 1e6, range(4)) == pytest.approx(1e-3 + 1e-3)


def test_expert_cost_by_ep():
    cluster = pcompile.Cluster.preset("8xA100-80GB")
    peak = cluster.device_of(0).peak_flops
    dense, ep4 = expert_cost(SHAPE, cluster, dp=8, ep=1), expert_cost(SHAPE, cluster, dp=8, ep=4)
    assert dense.compute == pytest.approx(3 * 512 * 8 * 16e6 / peak) and dense.all_to_all == 0.0
    assert ep4.compute == pytest.approx(dense.compute * 2 / 8)  # top_k / E of the dense form
    rows = 512 * 2 * 1024 * 4
    assert ep4.all_to_all == pytest.approx(4 * all_to_all_time(cluster, rows, range(4))
                                           + all_to_all_time(cluster, 64, range(4)))
    skewed = expert_cost(SHAPE, cluster, dp=8, ep=4, imbalance=1.5)
    assert skewed.compute == pytest.approx(1.5 * ep4.compute)
    assert dense.held_experts == 8 and (dense.sync_ranks, dense.sync_bytes) == (8, 8 * 8e6 * 4)
    assert ep4.held_experts == 2 and ep4.memory == pytest.approx(dense.memory / 4)
    assert ep4.memory == pytest.approx(2 * 8e6 * 4 * 4)  # parameters, gradients, two AdamW moments
    assert (ep4.sync_ranks, ep4.sync_bytes) == (2, 2 * 8e6 * 4)
    assert expert_cost(SHAPE, cluster, dp=8, ep=8).sync_bytes == 0.0  # one holder of each expert
    with pytest.raises(PcompileError, match="ep=3 must divide"):
        expert_cost(SHAPE, cluster, dp=8, ep=3)
