"""ZeRO-3 (sharded data parallel) == serial: loss after each of 3 AdamW steps and full gradients
within 1e-5 (fp32), for sdp on every layer (dp=4, dp=2 x tp=2) and mixed plans (some layers
sdp, some dp, a tied weight shared by both), on the built-in GPT and MLP models. Also: each
rank stores 1/dp of the sdp parameters, and between forward and backward no gathered parameter
is alive but those of the last unit (ZeRO-3, not ZeRO-1: autograd keeps references to shards,
not gathered weights); each unit's all-gather is issued while the previous unit computes
(test_sdp_overlap.py times the schedule). With the optimizer offloaded (Plan.offload_optimizer:
fp32 masters of the chunks in host memory, gradients moved there by the hook) the same holds."""
import torch
import torch.fx as fx

import pcompile
from pcompile import Plan
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import LayerAssignment, Strategy
from pcompile.runtime import sdp
from tests.distributed.ranks_sdp import compare_many

TOLERANCE = 1e-5
PARAM_TOLERANCE = 3 * 1e-2  # Adam on ~0 gradients, see test_equivalence.py


def mixed(dp: int, sdp_layers: tuple[str, ...]) -> Plan:
    """dp everywhere, ZeRO-3 in `sdp_layers`."""
    return Plan(num_devices=dp, default=Strategy(dp=dp),
                layers=tuple(LayerAssignment(layer, Strategy(dp=dp, sdp=True)) for layer in sdp_layers))


CASES = [
    ("gpt", Plan.uniform(dp=4, sdp=True)),
    ("mlp", Plan.uniform(dp=4, sdp=True)),
    ("gpt", Plan.uniform(dp=2, tp=2, sdp=True)),
    ("gpt", mixed(4, ("blocks.1", "post"))),  # the head's weight is tied to the (dp) embedding
    ("mlp6", mixed(4, ("blocks.0", "post"))),  # classifier weight sharded on dim 1, its bias replicated
    ("gpt", Plan(num_devices=4, default=Strategy(dp=4, sdp=True), layers=(  # with checkpointing / splitting
        LayerAssignment("blocks.0", Strategy(dp=4, sdp=True, checkpoint=True)),
        LayerAssignment("blocks.1", Strategy(dp=4, sdp=True, split=2))))),
    # the optimizer offloaded (fp32 masters of the chunks and their gradients in host memory)
    ("gpt", Plan.uniform(dp=4, sdp=True, offload_optimizer=True)),
    ("gpt", Plan.uniform(dp=2, tp=2, sdp=True, offload_optimizer=True)),
]


def test_sdp_plans_match_serial():
    per_rank = pcompile.launch(compare_many, 4, CASES)
    for results in per_rank:
        assert len(results) == len(CASES)
        for r, (_, plan) in zip(results, CASES):
            assert r["loss_diff"] < TOLERANCE, r
            assert r["grad_diff"] < TOLERANCE, r
            assert r["param_diff"] < PARAM_TOLERANCE, r
            assert r["sharded"] > 0, r
            assert r["numel"] == r["expected_numel"] < r["replicated_numel"], r
            if plan.default.sdp:  # every layer sdp and every parameter divisible: exactly 1/dp
                assert r["numel"] * plan.default.dp == r["replicated_numel"], r
            assert r["alive_after_forward"] <= r["last_unit"] <= 4, r  # ZeRO-1 would keep ~all 36
            assert r["offloaded"] == plan.offload_optimizer, r


def _rewritten(plan: Plan) -> pcompile.IR:
    cfg = GPTConfig()
    return pcompile.compile(GPT(cfg), pcompile.Cluster.local(plan.num_devices), gpt_inputs(cfg, 8), plan=plan,
                            stop_after="sharded_data_parallel")


def _reads(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == name for u in n.users]


def test_pass_gathers_every_read_of_sdp_parameters_and_keeps_names():
    plan = mixed(4, ("blocks.1", "post"))
    ir = _rewritten(plan)
    shardings = ir.sdp_shardings
    names = [n for n, _ in GPT(GPTConfig()).named_parameters()]
    assert [n for n, _ in ir.gm.named_parameters()] == names
    # blocks.1 and the tied head/embedding weight are sharded, blocks.0 is not
    # (recorded under every name of a parameter: the tied head is the embedding's table)
    assert set(shardings) == {n for n in names if n.startswith(("blocks.1.", "ln_f.", "tok_emb."))} | {"head.weight"}
    for name in set(shardings) & set(names):  # reads name a parameter by its canonical name
        reads = _reads(ir.gm, name)  # the unit's prefetch (the all-gather issued) and its gather (waited)
        assert sorted(u.target.__name__ for u in reads) == ["sdp_gather", "sdp_prefetch"], name
    gathers = [n for n in ir.graph.nodes if n.target is sdp.sdp_gather]
    # one collective per layer; the tied embedding / head weight is gathered once for both
    assert [ir.meta(n).layer for n in gathers] == ["pre", "blocks.1"]
    assert {a.target for a in gathers[0].args[0]} == {"tok_emb.weight", "ln_f.weight", "ln_f.bias"}
    assert not any(n.op == "call_module" and n.target.startswith("blocks.1.") for n in ir.graph.nodes)
    assert any(n.op == "call_module" and n.target.startswith("blocks.0.") for n in ir.graph.nodes)


def test_layers_with_operator_splitting_gather_one_piece_per_op():
    ir = _rewritten(Plan.uniform(dp=4, sdp=True, split=2))
    gathers = [n for n in ir.graph.nodes if n.target is sdp.sdp_gather]
    reading_ops = [n for n in ir.graph.nodes if n.target in (sdp.sdp_module, sdp.sdp_function, sdp.sdp_method)]
    # 2 blocks x (6 Linears x 2 pieces + 2 LayerNorms), 2 embeddings, ln_f, head x 2 pieces; the
    # last op (the head's second half) runs plainly: backward needs its weights first
    assert len(gathers) == len(reading_ops) + 1 == 33
    model = GPT(GPTConfig())
    canonical = {id(p): name.replace(".", "_") for name, p in model.named_parameters()}  # head.weight -> tok_emb
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    pieces = {u.name: ir.meta(u).shape for g in gathers for u in g.users if "_piece" in u.name}
    assert len(pieces) == 2 * len(linears)  # every Linear weight gathered as 2 halves, never whole
    for m in linears:
        for i in (0, 1):
            assert pieces[f"{canonical[id(m.weight)]}_piece{i}"] == (m.out_features, m.in_features // 2)


def test_pass_is_a_no_op_without_sdp():
    ir = _rewritten(Plan.uniform(dp=4))
    assert not any(n.target is sdp.sdp_gather for n in ir.graph.nodes)


def test_with_pipeline_stages_each_layer_gathers_its_own_unit():
    """pp > 1: a tied weight is gathered in each layer that reads it (the layers may run on
    different pp ranks), never once for both as at pp = 1."""
    cfg = GPTConfig(num_layers=4)
    plan = Plan(num_devices=4, default=Strategy(dp=2), pp=2, num_microbatches=2,
                layers=(LayerAssignment("post", Strategy(dp=2, sdp=True)),))
    ir = pcompile.compile(GPT(cfg), pcompile.Cluster.local(4), gpt_inputs(cfg, 8), plan=plan,
                          stop_after="sharded_data_parallel")
    gathers = [n for n in ir.graph.nodes if n.target is sdp.sdp_gather]
    assert [ir.meta(n).layer for n in gathers] == ["pre", "post"]
    assert {a.target for a in gathers[0].args[0]} == {"tok_emb.weight"}
    assert {a.target for a in gathers[1].args[0]} == {"tok_emb.weight", "ln_f.weight", "ln_f.bias"}


def _first_op(nodes: list[fx.Node], gather: fx.Node) -> int:
    """Position of the first op reading what `gather` gathered."""
    return min(nodes.index(op) for item in gather.users for op in item.users)


def test_each_unit_is_prefetched_while_the_previous_one_computes():
    """Forward prefetch: unit k's sdp_prefetch sits after unit k-1's gather and before its first
    op (its all-gather runs while unit k-1 computes); the first unit's right before its gather.
    A gather in a checkpointed layer whose prefetch is outside it is marked recomputed (backward
    re-runs it with forward's unit: a re-gather to prefetch)."""
    plan = Plan(num_devices=4, default=Strategy(dp=4, sdp=True),
                layers=(LayerAssignment("blocks.0", Strategy(dp=4, sdp=True, checkpoint=True)),))
    ir = _rewritten(plan)
    nodes = list(ir.graph.nodes)
    gathers = [n for n in nodes if n.target is sdp.sdp_gather]
    assert [ir.meta(g).layer for g in gathers] == ["pre", "blocks.0", "blocks.1"]
    for k, gather in enumerate(gathers):
        prefetch = gather.kwargs["prefetched"]
        assert prefetch.target is sdp.sdp_prefetch and prefetch.args == gather.args
        if k == 0:
            assert prefetch.next is gather
        else:
            assert nodes.index(gathers[k - 1]) < nodes.index(prefetch) < _first_op(nodes, gathers[k - 1])
            assert ir.meta(prefetch).layer == ir.meta(gathers[k - 1]).layer  # layers stay contiguous
    assert [g.kwargs.get("recomputed", False) for g in gathers] == [False, True, False]


def test_prefetch_stays_by_its_gather_across_dp_groupings_and_pipeline_stages():
    """A unit object cannot cross a batch regrouping (layers at other dp) nor a stage boundary."""
    plan = Plan(num_devices=4, default=Strategy(dp=4, sdp=True),
                layers=(LayerAssignment("blocks.1", Strategy(dp=2, tp=2, sdp=True)),))
    ir = _rewritten(plan)
    gathers = [n for n in ir.graph.nodes if n.target is sdp.sdp_gather]
    by_layer = {ir.meta(g).layer: g.kwargs["prefetched"].next is g for g in gathers}
    assert by_layer == {"pre": True, "blocks.0": False, "blocks.1": True}
    cfg = GPTConfig(num_layers=4)
    plan = Plan(num_devices=4, default=Strategy(dp=2, sdp=True), pp=2, num_microbatches=2)
    ir = pcompile.compile(GPT(cfg), pcompile.Cluster.local(4), gpt_inputs(cfg, 8), plan=plan,
                          stop_after="sharded_data_parallel")
    gathers = [n for n in ir.graph.nodes if n.target is sdp.sdp_gather]
    assert len(gathers) == 6 and all(g.kwargs["prefetched"].next is g for g in gathers)
