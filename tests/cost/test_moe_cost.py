"""The price of MoE experts under expert parallelism (pcompile.cost.moe): the layer's numbers
read from the built-in MoE GPT's IR, the ep degrees a search may offer, the all-to-all's
alpha-beta (or a measured fit), expert FLOPs by top-k / E under ep (the dense form's E
without), and the experts' memory per rank (E/ep held) and gradient sync (over dp/ep ranks)."""
import dataclasses

import pytest
import torch

import pcompile
from pcompile.cluster import Cluster, CollectiveFit, Device, NodeGroup
from pcompile.cost.moe import MoEShape, all_to_all_time, ep_degrees, expert_cost, expert_groups, moe_shapes
from pcompile.errors import PcompileError
from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs

CFG = MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, hidden=16, num_heads=2, seq_len=8, vocab_size=32)
SHAPE = MoEShape("blocks.0", num_experts=8, top_k=2, tokens=4096, hidden=1024, expert_params=8_000_000,
                 flops_per_token=16e6, weights=((4000, 1000), (1000, 4000)), tensors=(4_000_000, 4_000_000),
                 activation="relu")
# a roofline device: no launch overhead, no curves, memory too fast to matter (compute = FLOPs / peak)
FLAT = Device("flat", 80 * 2**30, 1e14, 1e20)


def flat(base: Cluster) -> Cluster:
    return dataclasses.replace(base, node_groups=(NodeGroup(FLAT, 1, base.num_devices),))


def test_shapes_read_from_the_ir():
    torch.manual_seed(0)
    ir = pcompile.compile(MoEGPT(CFG), pcompile.Cluster.local(2), moe_gpt_inputs(CFG, 4),
                          plan=pcompile.Plan.uniform(dp=2), stop_after="layers")
    shapes = moe_shapes(ir)
    h, f = CFG.hidden, CFG.hidden * CFG.mlp_ratio
    assert [(s.layer, s.num_experts, s.top_k, s.tokens, s.hidden, s.expert_params, s.flops_per_token, s.dense)
            for s in shapes] == [(layer, 4, 2, 4 * 8, h, 2 * h * f + f + h, 2.0 * 2 * h * f, True)
                                 for layer in ("blocks.0", "blocks.1")]
    assert shapes[0].weights == ((f, h), (h, f)) and shapes[0].tensors == (f * h, f, h * f, h)
    assert shapes[0].activation == "gelu" and shapes[0].saved > 0


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
    cluster = flat(cluster)  # FLOPs alone: the grouped-mm form computes k rows per token with or without ep
    plain = expert_cost(first, cluster, dp=4, ep=1)
    assert plain.compute == pytest.approx(expert_cost(first, cluster, dp=4, ep=2).compute, rel=1e-6)


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
    cluster = flat(pcompile.Cluster.preset("8xA100-80GB"))
    peak = FLAT.peak_flops
    dense, ep4 = expert_cost(SHAPE, cluster, dp=8, ep=1), expert_cost(SHAPE, cluster, dp=8, ep=4)
    assert dense.compute == pytest.approx(3 * 512 * 8 * 16e6 / peak, rel=1e-6) and dense.all_to_all == 0.0
    assert ep4.compute == pytest.approx(dense.compute * 2 / 8, rel=1e-6)  # top_k / E of the dense form
    rows = 512 * 2 * 1024 * 4
    assert ep4.all_to_all == pytest.approx(4 * all_to_all_time(cluster, rows, range(4))
                                           + all_to_all_time(cluster, 64, range(4)))
    skewed = expert_cost(SHAPE, cluster, dp=8, ep=4, imbalance=1.5)
    assert skewed.compute == pytest.approx(1.5 * ep4.compute, rel=1e-6)
    assert dense.held_experts == 8 and (dense.sync_ranks, dense.sync_bytes) == (8, 8 * 8e6 * 4)
    assert ep4.held_experts == 2 and ep4.memory == pytest.approx(dense.memory / 4)
    assert ep4.memory == pytest.approx(2 * 8e6 * 4 * 4)  # parameters, gradients, two AdamW moments
    assert (ep4.sync_ranks, ep4.sync_bytes) == (2, 2 * 8e6 * 4)
    assert expert_cost(SHAPE, cluster, dp=8, ep=8).sync_bytes == 0.0  # one holder of each expert
    with pytest.raises(PcompileError, match="ep=3 must divide"):
        expert_cost(SHAPE, cluster, dp=8, ep=3)


def test_expert_groups_as_the_backend_lays_them_out():
    # rank = first + d * tp + t: an ep group is ep dp coordinates at one tp coordinate (tp apart),
    # the holders of one ep coordinate every ep-th dp coordinate
    group, holders = expert_groups(8, dp=4, tp=2, ep=2)
    assert group == [8, 10]
    assert sorted(map(tuple, holders)) == [(8, 12), (9, 13), (10, 14), (11, 15)]


def test_expert_sync_over_the_holders_after_backward():
    cluster = pcompile.Cluster.preset("8xA100-80GB")
    ep2 = expert_cost(SHAPE, cluster, dp=8, ep=2)
    holders = expert_groups(0, 8, 1, 2)[1]
    per_tensor = cluster.collective_time("all_reduce", 4_000_000 * 4.0, holders)
    divide = 2 * 4 * 8e6 * 4.0 / cluster.device_of(0).memory_bandwidth  # held gradients divided by dp in place
    assert ep2.sync == pytest.approx(4 * 2 * per_tensor + divide)  # 4 experts held, 2 tensors each
    mixed = expert_cost(SHAPE, cluster, dp=8, ep=2, state_bytes=(2.0, 4.0, 12.0), mixed_precision=True)
    assert (mixed.param_bytes, mixed.grad_bytes, mixed.optimizer_bytes) == (4 * 8e6 * 2, 4 * 8e6 * 4, 4 * 8e6 * 12)
