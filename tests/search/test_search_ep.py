"""Expert parallelism in the search (issue #18 item 3): the space lists ep where it divides dp
and the runtime runs it; a search offers the ep degrees dividing the experts, one per engine
run (one ep degree per plan), and only on the layers holding a mixture of experts; it picks ep
for a MoE GPT whose replicated experts do not fit 8 A100s, and on a small model it follows the
price either way."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import pcompile
from pcompile.api import plan_and_ir
from pcompile.cost.plan_price import price
from pcompile.cost.pricing import CostOptions
from pcompile.cost.stage_costs import StageCosts
from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs
from pcompile.passes.search_runs import cost_callback, engine_runs, ep_offered
from pcompile.plan import Plan, Strategy
from pcompile.search.engine import StageQuery
from pcompile.search.space import SearchRules, SearchSpace, strategies_for


def test_space_lists_ep_where_it_divides_dp_and_the_runtime_runs_it():
    plain = strategies_for(8, 8, 8, SearchSpace(), SearchRules())
    offered = strategies_for(8, 8, 8, SearchSpace(ep=(1, 2, 4)), SearchRules())
    assert all(s.ep == 1 for s in plain)
    assert tuple(s for s in offered if s.ep == 1) == plain  # ep = 1 listed as before, in order
    with_ep = [s for s in offered if s.ep > 1]
    assert with_ep and all(s.dp % s.ep == 0 and not (s.sdp or s.zero2 or s.sp) and s.split == 1 for s in with_ep)
    assert {(s.dp, s.ep) for s in with_ep} == {(8, 2), (8, 4), (4, 2), (4, 4), (2, 2)}


def test_ep_offered_divides_the_experts_and_dp():
    assert ep_offered({"b": (6, False)}, 8, [1, 2], None, False) == {1: (2,), 2: (2,)}
    # batched (HF) experts too: whole on every tp rank under tp, as the ModuleList ones
    assert ep_offered({"b": (8, True)}, 8, [1, 2], None, False) == {1: (2, 4, 8), 2: (2, 4)}
    assert ep_offered({"b": (8, False)}, 8, [1], (1, 4), False) == {1: (4,)}
    assert ep_offered({"b": (8, False)}, 8, [1], (1,), False) == {1: ()}  # search_space ep=(1,): off
    assert ep_offered({"b": (8, False)}, 8, [1], None, True) == {} and ep_offered({}, 8, [1], None, False) == {}
    runs = engine_runs(None, {}, [1, 2], ("pre", "b", "post"), False, one_grouping=True, ep_offer={1: (2, 4)})
    assert [fields.get("ep", (1,)) for fields, _, _ in runs] == [(1,), (1, 2), (1, 4), (1,)]


def _tiny(experts: int, top_k: int):
    return MoEGPTConfig(vocab_size=64, seq_len=16, hidden=32, num_heads=2, num_layers=2, num_experts=experts,
                        top_k=top_k, aux_loss_coef=0.01)


def test_tables_give_ep_to_moe_layers_only():
    cfg = _tiny(4, 2)
    torch.manual_seed(0)
    ir = pcompile.compile(MoEGPT(cfg), pcompile.Cluster.local(4), moe_gpt_inputs(cfg, 8), plan=Plan.uniform(dp=4),
                          stop_after="layers")
    costs = StageCosts(ir, pcompile.Cluster.preset("8xA100-80GB"), CostOptions.runtime())
    strategies = (Strategy(dp=8), Strategy(dp=8, ep=2), Strategy(dp=8, ep=4), Strategy(dp=8, ep=8))
    table = cost_callback(ir, costs, {}, dp_one=False)({})(StageQuery(1, 0, 0, 8, 8, strategies))
    finite = np.isfinite(table.fwd_time)
    for i, layer in enumerate(table.layers):
        moe = layer in ("blocks.0", "blocks.1")
        # ep 2 and 4 divide the 4 experts of the MoE layers; ep 8 does not; no ep without experts
        assert finite[i].tolist() == [True, moe, moe, False], layer


def _ep_flipped(plan: Plan, moe_layers, ep: int) -> Plan:
    """`plan` with its MoE layers at `ep` (plain dp where the runtime needs it), the rest alike."""
    def flip(a):
        if a.layer not in moe_layers:
            return a
        s = a.strategy
        s = Strategy(dp=s.dp, tp=s.tp, checkpoint=s.checkpoint, ep=ep) if ep > 1 else dataclasses.replace(s, ep=1)
        return dataclasses.replace(a, strategy=s)
    return dataclasses.replace(plan, layers=tuple(flip(a) for a in plan.layers))


def test_search_picks_ep_for_a_moe_whose_replicated_experts_do_not_fit():
    # 8 experts of 8 x 6144^2 parameters in each of 2 blocks: 4.8B expert parameters, 77 GB of
    # fp32 AdamW states replicated on each A100 (budget 72.9 GiB)
    cfg = MoEGPTConfig(vocab_size=512, seq_len=256, hidden=6144, num_heads=48, num_layers=2, num_experts=8, top_k=2)
    with torch.device("meta"):
        model = MoEGPT(cfg)
    cluster = pcompile.Cluster.preset("8xA100-80GB")
    plan, ir = plan_and_ir(model, cluster, moe_gpt_inputs(cfg, 8))
    moe = {"blocks.0", "blocks.1"}
    chosen = {a.layer: a.strategy for a in plan.layers}
    assert all(chosen[layer].ep > 1 for layer in moe) and all(s.ep == 1 for l, s in chosen.items() if l not in moe)
    assert "offered ep [2, 4, 8]" in plan.explanation
    options = CostOptions.runtime()
    assert price(ir, cluster, plan, options)[0] == plan.estimate  # one price for the plan
    replicated, _ = price(ir, cluster, Plan.uniform(dp=8), options)
    assert replicated.peak_memory > replicated.memory_budget  # the experts replicated do not fit
    without, cost = price(ir, cluster, _ep_flipped(plan, moe, 1), options)
    assert not cost.fits or without.step_time > plan.estimate.step_time


def test_small_moe_takes_ep_only_where_the_price_says_it_pays():
    # top-2 of 2 experts: ep computes what the dense form computes, and adds the all-to-alls
    cfg = _tiny(2, 2)
    torch.manual_seed(0)
    cluster = pcompile.Cluster.local(4)
    plan, ir = plan_and_ir(MoEGPT(cfg), cluster, moe_gpt_inputs(cfg, 8))
    moe = {"blocks.0", "blocks.1"}
    assert "offered ep [2]" in plan.explanation
    uses = {a.strategy.ep for a in plan.layers if a.layer in moe} != {1}
    other, cost = price(ir, cluster, _ep_flipped(plan, moe, 1 if uses else 2), CostOptions.runtime())
    assert cost.fits and plan.estimate.step_time <= other.step_time  # the search's choice is the cheaper
    off = pcompile.plan(MoEGPT(cfg), cluster, moe_gpt_inputs(cfg, 8), search_space={"ep": (1,)})
    assert all(a.strategy.ep == 1 for a in off.layers) and "ep not offered (turned off" in off.explanation
    with pytest.raises(pcompile.PcompileError, match="not positive integers"):
        SearchSpace(ep=(1, 0))
