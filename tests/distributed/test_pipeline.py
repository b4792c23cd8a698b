"""Pipeline parallelism == serial: loss after each of 3 AdamW steps and full gradients within
1e-5 (fp32) for GPipe, 1F1B and interleaved 1F1B (2 and 3 virtual stages) at pp=2 and pp=4,
pp x dp, pp x tp, and ZeRO-3 inside stages (pp x sdp, with activation checkpointing, mixed
with dp layers over a tied weight, interleaved), on the built-in GPT (tied and untied head)
and the MLP, and 3-D pp2 x dp2 x tp2 (dp or sdp, ZeRO-3 over the tied embedding/head too;
per-layer tp degrees mixed inside the stages, forced and searched). One 2-, one 4- and one
8-rank launch. Plus the pass's pure parts (balanced cut, stage assignment, errors) without
ranks."""
import dataclasses

import pytest
import torch

import pcompile
from pcompile.cluster import Device, NodeGroup
from pcompile.cost.plan_price import with_stages
from pcompile.cost.pricing import CostOptions
from pcompile.cost.stage_costs import StageCosts
from pcompile.errors import PcompileError
from pcompile.models import GPT, gpt_inputs
from pcompile.passes.pipeline_split import check_schedule
from pcompile.plan import LayerAssignment, Strategy
from pcompile.runtime.loss_counts import step_counts
from pcompile.search.space import balanced_split
from tests.distributed.ranks_pipeline import GPT4, MODELS, compare_many, describe, pipeline_plan, with_layers

TOLERANCE = 1e-5
PARAM_TOLERANCE = 3e-3  # 3 Adam steps of lr=1e-3 on entries whose gradient is rounding noise

CASES = {
    2: [("gpt4", pipeline_plan(2, "GPipe", 2)),
        ("gpt4", pipeline_plan(2, "1F1B", 4)),
        ("gpt4", pipeline_plan(2, "Interleaved1F1B", 4)),
        ("gpt4-untied", pipeline_plan(2, "1F1B", 2)),
        ("mlp4", pipeline_plan(2, "GPipe", 2)),
        ("mlp4", pipeline_plan(2, "Interleaved1F1B", 2)),
        ("mlp6", pipeline_plan(2, "Interleaved1F1B", 2, virtual_stages=3))],
    4: [("gpt4", pipeline_plan(4, "GPipe", 4)),
        ("gpt4", pipeline_plan(4, "1F1B", 4)),
        ("gpt8", pipeline_plan(4, "Interleaved1F1B", 4)),
        ("mlp8", pipeline_plan(4, "Interleaved1F1B", 8)),
        ("gpt4", pipeline_plan(2, "1F1B", 2, dp=2)),
        ("gpt4", pipeline_plan(2, "Interleaved1F1B", 2, tp=2)),
        ("mlp4", pipeline_plan(2, "GPipe", 2, dp=2)),
        ("mlp4", pipeline_plan(2, "1F1B", 2, tp=2)),
        ("gpt4", pipeline_plan(2, "1F1B", 2, dp=2, sdp=True)),
        ("gpt4", pipeline_plan(2, "1F1B", 2, dp=2, sdp=True, checkpoint=("blocks.0", "blocks.3"))),
        ("gpt4", dataclasses.replace(pipeline_plan(2, "GPipe", 2, dp=2), layers=(  # head sdp, tied embedding dp
            LayerAssignment("blocks.2", Strategy(dp=2, sdp=True)), LayerAssignment("post", Strategy(dp=2, sdp=True))))),
        ("mlp4", pipeline_plan(2, "Interleaved1F1B", 2, dp=2, sdp=True))],
    # 3-D: pp2 x dp2 x tp2, pp2 x sdp2 x tp2 and both with sp, one 8-rank launch; ZeRO-3 x tp over GPT's tied
    # embedding/head on both stages (each stage's dp chunk of its tp shard, summed over the two pp ranks);
    # per-layer tp mixing in the stages (and a searched such plan: searched_mixed_case)
    8: [("gpt4", pipeline_plan(2, "1F1B", 2, dp=2, tp=2)),
        ("mlp4", pipeline_plan(2, "Interleaved1F1B", 2, dp=2, tp=2)),
        ("gpt4-untied", pipeline_plan(2, "1F1B", 2, dp=2, tp=2, sdp=True)),
        ("mlp4", pipeline_plan(2, "GPipe", 2, dp=2, tp=2, sdp=True)),
        ("gpt4", pipeline_plan(2, "1F1B", 2, dp=2, tp=2, sp=True)),  # sequence parallelism inside the stages
        ("gpt4", pipeline_plan(2, "1F1B", 2, dp=2, tp=2, sdp=True, sp=True)),  # sdp x tp over the tied weight
        # per-layer (dp, tp) groupings inside the stages (passes/reshard.py), 4 interleaved stages [pre, blocks.0]
        # [blocks.1] [blocks.2] [blocks.3, post]: the tied embedding / head at dp4 on the first and last stage, the
        # grouping changing at every boundary (sdp4 -> ZeRO-2 at dp2·tp2 -> dp1·tp4, its dp axis one rank -> sdp2·tp2)
        ("gpt4", with_layers(pipeline_plan(2, "Interleaved1F1B", 2, dp=2, tp=2), pre=Strategy(dp=4),
                             blocks_0=Strategy(dp=4, sdp=True), blocks_1=Strategy(dp=2, tp=2, zero2=True),
                             blocks_2=Strategy(dp=1, tp=4), blocks_3=Strategy(dp=2, tp=2, sdp=True),
                             post=Strategy(dp=4)))],
}


def two_nodes(memory_mib: float, inter_node: tuple[float, float]) -> pcompile.Cluster:
    """2 nodes x 2 CPU devices with fast links inside a node and `inter_node` (bytes/s, s) between."""
    device = Device(name="cpu", memory_bytes=int(memory_mib * 2**20), peak_flops=20e9, memory_bandwidth=10e9)
    return pcompile.Cluster((NodeGroup(device, 2, 2),), 1e11, 1e-7, *inter_node, "gloo", "2x2")


SLOW, FAST = (1e8, 1e-4), (1e10, 1e-6)
# The search under tight memory: pp across the slow inter-node link with ZeRO-3 inside a node,
# and interleaved 1F1B when the link is fast enough for its extra sends (asserted below).
SEARCHED = [("gpt4", two_nodes(2.2, SLOW)), ("gpt4", two_nodes(1.2, FAST)), ("mlp8", two_nodes(2.0, FAST))]


def searched_cases() -> list[tuple[str, pcompile.Plan]]:
    # pp=2 asked for: these cases test searched pipelines (with sp, pp=1 tp plans can beat them)
    cases = [(name, pcompile.plan(MODELS[name][0](), cluster, MODELS[name][1](0), search_space={"pp_degrees": (2,)}))
             for name, cluster in SEARCHED]
    (_, zero3), (_, gpt_interleaved), (_, mlp_interleaved) = cases
    assert zero3.pp == 2 and any(a.strategy.sdp for a in zero3.layers), str(zero3)
    for plan in (gpt_interleaved, mlp_interleaved):
        assert plan.pp == 2 and (plan.schedule, plan.virtual_stages) == ("Interleaved1F1B", 2), str(plan)
    return cases


def searched_mixed_case() -> tuple[str, pcompile.Plan]:
    """A pipeline the search chose with per-layer tp: on 8 ranks in 2 stages, the large-vocabulary GPT's
    tied embedding / head at another tp than its blocks."""
    name = "gpt4-vocab"
    plan = pcompile.plan(MODELS[name][0](), pcompile.Cluster.local(8), MODELS[name][1](0),
                         search_space={"pp_degrees": (2,)})
    assert plan.pp == 2 and len({a.strategy.tp for a in plan.layers} | {plan.default.tp}) > 1, str(plan)
    return name, plan


@pytest.mark.parametrize("world", sorted(CASES))
def test_pipeline_plans_match_serial(world):
    """The 4-rank launch also runs plans the search chose (`searched_cases`), the 8-rank one a
    searched pipeline mixing tp degrees (`searched_mixed_case`)."""
    cases = CASES[world] + (searched_cases() if world == 4 else []) + ([searched_mixed_case()] if world == 8 else [])
    per_rank = pcompile.launch(compare_many, world, cases)
    assert len(per_rank) == world
    for (name, plan), *results in zip(cases, *per_rank):
        total = sum(p.numel() for p in MODELS[name][0]().parameters())
        for r in results:
            assert (r["model"], r["plan"]) == (name, describe(plan))
            assert r["loss_diff"] < TOLERANCE, r
            assert r["grad_diff"] < TOLERANCE, r
            assert r["param_diff"] < PARAM_TOLERANCE, r
            assert r["keys"], r
            stages = r["stages"]
            assert stages == sorted(stages) and set(stages) == set(range(plan.pp * plan.virtual_stages)), r
            assert r["plan_stages"] == stages, r  # the cut is recorded in the plan (virtual stage indices)
            assert r["local_params"] < total, r  # each rank holds only its stages' parameters
            checkpointed = sorted(a.layer for a in plan.layers if a.strategy.checkpoint)
            assert r["checkpointed"] == checkpointed, r
        assert len({(r["loss_diff"], r["grad_diff"]) for r in results}) == 1  # every rank got the same views
        sharded = plan.default.sdp or any(a.strategy.sdp for a in plan.layers)
        assert (sum(r["sdp_chunks"] for r in results) > 0) == sharded  # sdp layers keep a dp chunk only
        assert (sum(r["regions"] for r in results) > 0) == bool(checkpointed)  # their stages hold the regions
        if name == "gpt4-untied" and plan.num_devices == plan.pp:
            assert sum(r["local_params"] for r in results) == total


# -- the pass alone (no ranks) -------------------------------------------------------------
def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([1, 1, 1, 1], 2) == [0, 0, 1, 1]
    assert balanced_split([1, 1, 1, 1], 2, last=2) == [0, 0, 0, 1]  # the head's FLOPs weigh on the last stage
    assert balanced_split([1, 1, 1, 1], 4) == [0, 1, 2, 3]
    assert balanced_split([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]  # 5 | 5 beats 6 | 4


@pytest.fixture(scope="module")
def gpt_ir():
    torch.manual_seed(0)
    model = GPT(GPT4)
    x, y = gpt_inputs(GPT4, 8)
    plan = pipeline_plan(2, "Interleaved1F1B", 4)
    ir = pcompile.compile(model, pcompile.Cluster.local(2), (x, y), plan=plan, stop_after="pipeline_split")
    return model, ir, (x, y)


def test_stages_chain_to_the_serial_loss(gpt_ir):
    model, ir, (x, y) = gpt_ir
    split = ir.pipeline
    assert [s.rank for s in split.stages] == [0, 1, 0, 1]
    assert split.tied == ("tok_emb.weight",)  # embedding (stage 0) = head (stage 3): different ranks
    assert split.stages[0].layers[0] == "pre" and split.stages[-1].layers[-1] == "post"
    acts: tuple = ()
    counts = step_counts(ir.loss_counts, (x, y), None)  # the step's valid targets, as the backend passes them
    with torch.no_grad():
        for stage in split.stages:
            out = stage.gm(*acts, idx=x, targets=y, **counts)
            acts = out if isinstance(out, tuple) else (out,)
            assert bool(stage.inputs) == (stage.index > 0)  # activations only: model inputs are keywords
        # each micro-batch's loss is its sum x 4 (the micro-batches the runtime averages) / the step's count:
        # the whole batch through the stages is 4 x the serial loss
        assert torch.allclose(acts[0] / 4, model(x, y), rtol=1e-6)
    names = {n for s in split.stages for n, _ in s.gm.named_parameters(remove_duplicate=False)}
    assert {n for n, _ in model.named_parameters(remove_duplicate=False)} == names  # original names kept


def _stages(ir, plan) -> dict[str, int]:
    """layer -> stage of the plan as the search pass completes it (pcompile.cost.plan_price.with_stages)."""
    costs = StageCosts(ir, pcompile.Cluster.local(plan.num_devices), CostOptions.runtime())
    return {a.layer: a.stage for a in with_stages(ir, plan, costs, 8).layers}


def test_given_stages_are_used_and_checked(gpt_ir):
    _, ir, _ = gpt_ir
    base = pipeline_plan(2, "GPipe", 2)
    layers = ("pre", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "post")
    given = dataclasses.replace(base, layers=tuple(
        LayerAssignment(layer, base.default, stage) for layer, stage in zip(layers, (0, 0, 1, 1, 1, 1))))
    assert [_stages(ir, given)[layer] for layer in layers] == [0, 0, 1, 1, 1, 1]
    empty_first = dataclasses.replace(base, layers=tuple(LayerAssignment(layer, base.default, 1) for layer in layers))
    with pytest.raises(PcompileError, match="every stage used"):
        _stages(ir, empty_first)
    interleaved = dataclasses.replace(given, schedule="Interleaved1F1B", virtual_stages=2, num_microbatches=4,
                                      layers=tuple(LayerAssignment(layer, base.default, stage)
                                                   for layer, stage in zip(layers, (0, 0, 1, 2, 3, 3))))
    assert [_stages(ir, interleaved)[layer] for layer in layers] == [0, 0, 1, 2, 3, 3]
    with pytest.raises(PcompileError, match="every stage used"):  # stage 3 (pp rank 1's second chunk) empty
        _stages(ir, dataclasses.replace(interleaved, layers=tuple(
            LayerAssignment(layer, base.default, stage) for layer, stage in zip(layers, (0, 0, 1, 2, 2, 2)))))
    with pytest.raises(PcompileError, match="4 layers to cut but the plan needs 8"):
        _stages(ir, pipeline_plan(4, "Interleaved1F1B", 4))


def test_schedule_limits_are_errors_at_compile_time():
    with pytest.raises(PcompileError, match="1F1B with pp=4 needs at least 4 micro-batches"):
        check_schedule(pipeline_plan(4, "1F1B", 2), 8)
    with pytest.raises(PcompileError, match="does not split into dp=2 x 8 micro-batches"):
        check_schedule(pipeline_plan(2, "GPipe", 8, dp=2), 8)
    check_schedule(pipeline_plan(2, "Interleaved1F1B", 4), 8)
