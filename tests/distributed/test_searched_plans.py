"""The search's plans run for real: on 4 gloo ranks, under a roomy and a tight memory budget,
the searched plan (whatever per-layer strategies, stages and micro-batches it chose) trains
with the serial model's losses and gradients, and fits the budget it was given. Without
pipelining the search mixes tp degrees across layers (the tied GPT's embedding and head at
one grouping, its blocks at another), and those plans run exactly too; so do those in which it
chooses ZeRO-2 layers."""
import pcompile
from pcompile.plan import Plan
from tests.distributed.ranks_searched import many

ROOMY = 4 * 2**30
# Below what pure data parallelism needs for the tiny GPT (~1.9 MiB predicted per device),
# so the search has to shard, pipeline or checkpoint.
TIGHT = int(1.2 * 2**20)
TIGHTER = int(0.8 * 2**20)  # the search must also checkpoint a layer
# Without pipelining, ZeRO-3 and ZeRO-2, budgets under which the search mixes tp degrees across layers
PP1_NO_SDP = {"pp_degrees": (1,), "sdp": (False,), "zero2": (False,)}
MIXED = [("gpt", 2 * 2**20, PP1_NO_SDP), ("mlp", 2**20, PP1_NO_SDP), ("mlp", int(0.4 * 2**20), PP1_NO_SDP)]
# with ZeRO-2 allowed, that GPT budget is met by sharding the blocks' gradients and Adam states instead
ZERO2 = [("gpt", 2 * 2**20, {"pp_degrees": (1,), "sdp": (False,)})]
CASES = [("gpt", ROOMY), ("gpt", TIGHT), ("gpt", TIGHTER), ("mlp", ROOMY)] + ZERO2 + MIXED


def test_searched_plans_match_serial_and_fit():
    per_rank = pcompile.launch(many, 4, CASES)
    for results in per_rank:
        for (name, budget, *_), r in zip(CASES, results):
            plan = Plan.from_dict(r["plan"])
            assert plan.estimate.peak_memory <= budget, (name, str(plan))
            assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, (name, str(plan), r)
    tight_plan = Plan.from_dict(per_rank[0][1]["plan"])
    roomy_plan = Plan.from_dict(per_rank[0][0]["plan"])
    assert tight_plan != roomy_plan, "a tighter budget must change the plan"
    tighter_plan = Plan.from_dict(per_rank[0][2]["plan"])
    assert any(a.strategy.checkpoint for a in tighter_plan.layers), str(tighter_plan)
    zero2_plan = Plan.from_dict(per_rank[0][4]["plan"])
    assert any(a.strategy.zero2 for a in zero2_plan.layers), str(zero2_plan)
    for r in per_rank[0][5:]:
        plan = Plan.from_dict(r["plan"])
        assert len({a.strategy.tp for a in plan.layers}) > 1, f"expected a plan mixing tp degrees: {plan}"
