"""A mixture-of-experts layer priced under expert parallelism by the search's tables
(pcompile.cost.stage_costs -> pcompile.cost.moe.ep_layer_cost): its work without the dense
mixture (the nodes the ep rewrite erases: every expert's parameters and FLOPs, nothing else)
plus the experts as cost/moe.py prices them; the layers without a mixture as under ep = 1;
one price for a plan (pcompile.estimate and the search's tables) holding E/ep experts."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import pcompile
from pcompile.cost.moe import ep_layer_cost, expert_cost
from pcompile.cost.plan_price import price
from pcompile.cost.pricing import CostOptions, layer_cost
from pcompile.cost.stage_costs import StageCosts
from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs
from pcompile.plan import Plan, Strategy

CFG = MoEGPTConfig(vocab_size=64, seq_len=16, hidden=32, num_heads=2, num_layers=2, num_experts=4, top_k=2,
                   aux_loss_coef=0.01)
BATCH = 8
ADAM = 16.0  # fp32 parameter, gradient and two AdamW moments per element


@pytest.fixture(scope="module")
def moe_ir():
    torch.manual_seed(0)
    return pcompile.compile(MoEGPT(CFG), pcompile.Cluster.local(4), moe_gpt_inputs(CFG, BATCH),
                            plan=Plan.uniform(dp=4), stop_after="layers")


def test_ep_work_leaves_out_the_dense_mixture_only(moe_ir):
    costs = StageCosts(moe_ir, pcompile.Cluster.local(4), CostOptions.runtime())
    assert sorted(costs.moe) == ["blocks.0", "blocks.1"]
    shape = costs.moe["blocks.0"][0]
    distinct, index = costs.works(1)
    dense, ep = distinct[index[moe_ir.layers.index("blocks.0")]], costs.ep_work(1, "blocks.0")
    assert sum(dense.param_numels) - sum(ep.param_numels) == CFG.num_experts * shape.expert_params
    # every expert's two Linears on every token are gone; the gated sum's elementwise ops with them
    dropped = sum(w.flops for w in dense.ops) - sum(w.flops for w in ep.ops)
    experts = CFG.num_experts * shape.tokens * shape.flops_per_token
    assert experts <= dropped <= 1.05 * experts
    assert ep.saved < dense.saved and dense.saved - ep.saved == pytest.approx(shape.saved)


def test_layer_price_under_ep_adds_the_experts_of_cost_moe(moe_ir):
    cluster, options = pcompile.Cluster.local(4), CostOptions.runtime()
    costs = StageCosts(moe_ir, cluster, options)
    shape, s = costs.moe["blocks.0"][0], Strategy(dp=4, ep=2)
    work = costs.ep_work(1, "blocks.0")
    got = ep_layer_cost(work, shape, cluster, s, BATCH, BATCH, options)
    base = layer_cost(work, cluster, Strategy(dp=4), BATCH, BATCH, options)
    e = expert_cost(shape, cluster, 4, 2, state_bytes=options.state_bytes())
    assert got.fwd == pytest.approx(base.fwd + e.fwd + e.a2a_fwd)
    assert got.bwd == pytest.approx(base.bwd + e.bwd + e.a2a_bwd)
    assert got.sync == pytest.approx(base.sync + e.sync) and e.sync_ranks == 2
    assert got.memory.params == pytest.approx(base.memory.params + 2 * shape.expert_params * 4.0)
    ckpt = ep_layer_cost(work, shape, cluster, dataclasses.replace(s, checkpoint=True), BATCH, BATCH, options)
    # a checkpointed ep block recomputes its dispatch in backward: the experts' forward once more
    base_ckpt = layer_cost(work, cluster, Strategy(dp=4, checkpoint=True), BATCH, BATCH, options)
    assert ckpt.bwd == pytest.approx(base_ckpt.bwd + e.bwd + e.a2a_bwd + e.fwd + e.a2a_fwd)
    with pytest.raises(pcompile.PcompileError, match="ZeRO-3"):
        ep_layer_cost(work, shape, cluster, Strategy(dp=4, sdp=True, ep=2), BATCH, BATCH, options)


def test_uniform_ep_plan_is_priced_with_e_over_ep_experts(moe_ir):
    cluster, options = pcompile.Cluster.local(4), CostOptions.runtime()
    costs = StageCosts(moe_ir, cluster, options)
    per_expert = costs.moe["blocks.0"][0].expert_params
    strategies = (Strategy(dp=4), Strategy(dp=4, ep=2), Strategy(dp=4, ep=4))
    table = costs.table(0, 4, BATCH, strategies)
    for i, layer in enumerate(table.layers):
        for j, s in enumerate(strategies[1:], 1):
            dropped = (CFG.num_experts - CFG.num_experts // s.ep) * per_expert * ADAM if layer in costs.moe else 0.0
            assert table.state_memory[i, j] == pytest.approx(table.state_memory[i, 0] - dropped)
            if layer not in costs.moe:  # ep leaves a layer without experts alone
                assert (table.fwd_time[i, j], table.sync_time[i, j]) == (table.fwd_time[i, 0], table.sync_time[i, 0])
    # one price whoever asks: pcompile.estimate of the ep plan is the tables' price
    estimate = pcompile.estimate(MoEGPT(CFG), cluster, moe_gpt_inputs(CFG, BATCH), Plan.uniform(dp=4, ep=4))
    priced, cost = price(moe_ir, cluster, Plan.uniform(dp=4, ep=4), options)
    assert estimate == priced
    dense, _ = price(moe_ir, cluster, Plan.uniform(dp=4), options)
    assert dense.peak_memory - estimate.peak_memory >= 2 * (CFG.num_experts - 1) * per_expert * ADAM
