"""The reshard rewrite (no process group): on the 4-block GPT with the issue's plan (blocks 0-1
at dp2·tp2, blocks 2-3 at dp1·tp4, the head at dp4·tp1), the IR after the pass has one batch
all-gather and two batch slices where the dp degree changes, degree-named axes on the layers
off the default grouping, the tied weight's coarser read scaled, and the layout the backend
needs. Uniform plans are left alone; plans the pass cannot run are refused."""
import dataclasses

import pytest
import torch

import pcompile
from pcompile.errors import PcompileError
from pcompile.mesh import regroup_groups
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import LayerAssignment, Plan, Strategy
from pcompile.runtime.batch_regroup import batch_gather, batch_slice, grad_scale
from pcompile.runtime.collectives import tp_copy, tp_reduce
from tests.distributed.ranks_mixed import LinearFirstModel

CFG = GPTConfig(num_layers=4)
MIXED = Plan(num_devices=4, default=Strategy(dp=2, tp=2), layers=(
    LayerAssignment("blocks.2", Strategy(dp=1, tp=4)), LayerAssignment("blocks.3", Strategy(dp=1, tp=4)),
    LayerAssignment("post", Strategy(dp=4, tp=1))))


def _ir(plan: Plan, model=None, inputs=None):
    torch.manual_seed(0)
    return pcompile.compile(model or GPT(CFG), pcompile.Cluster.local(4), inputs or gpt_inputs(CFG, 8), plan=plan,
                            stop_after="reshard")


def _calls(ir, fn):
    return [n for n in ir.graph.nodes if n.op == "call_function" and n.target is fn]


def _layer(ir, node):
    return ir.meta(node).layer


def test_mixed_plan_inserts_batch_reshards_and_names_axes():
    ir = _ir(MIXED)
    counts = ir.op_counts()
    assert counts["call_function:pcompile.runtime.batch_regroup.batch_gather"] == 1
    assert counts["call_function:pcompile.runtime.batch_regroup.batch_slice"] == 2
    assert counts["call_function:pcompile.runtime.batch_regroup.grad_scale"] == 1
    assert counts["call_function:pcompile.runtime.collectives.tp_copy"] == 8  # q/k/v and fc inputs of 4 blocks
    # blocks.1 (dp2) -> blocks.2 (dp1): gather the two halves of the batch over ranks 2 apart
    (gather,) = _calls(ir, batch_gather)
    assert _layer(ir, gather) == "blocks.2" and _layer(ir, gather.args[0]) == "blocks.1"
    assert gather.args[1:] == (0, "batch1:2", 2)
    # blocks.3 (dp1) -> post (dp4), and the targets (an input, split at pre's dp2) -> post (dp4)
    slices = {_layer(ir, n.args[0]): n for n in _calls(ir, batch_slice)}
    assert sorted(slices) == ["blocks.3", "pre"]
    assert slices["blocks.3"].args[1:] == (0, "batch1:4", 4)
    assert slices["pre"].args[0].op == "placeholder" and slices["pre"].args[1:] == (0, "batch2:4", 2)
    assert all(_layer(ir, n) == "post" for n in slices.values())
    # tp collectives: "tp" (the default mesh) in blocks 0-1, "tp4" in blocks 2-3
    for node in _calls(ir, tp_copy) + _calls(ir, tp_reduce):
        expected = ("tp", 2) if _layer(ir, node) in ("blocks.0", "blocks.1") else ("tp4", 4)
        assert tuple(node.args[1:]) == expected, node.format_node()
    assert ir.param_shardings["blocks.0.attn.q.weight"].axis == "tp"
    assert ir.param_shardings["blocks.2.attn.q.weight"].axis == "tp4"
    assert ir.param_shardings["blocks.3.mlp.out.weight"].size == 4


def test_layout_scales_the_tied_weight_to_its_finest_group():
    ir = _ir(MIXED)
    layout = ir.mixed_layout
    assert (layout.input_axis, layout.input_dp, layout.loss_axis, layout.loss_dp) == ("dp", 2, "dp4", 4)
    assert layout.param_axes["blocks.0.ln1.weight"] == ("dp", 2)
    assert layout.param_axes["blocks.2.attn.q.weight"] == ("dp1", 1)
    assert layout.param_axes["ln_f.weight"] == ("dp4", 4)
    # the embedding (pre, dp2) and LM head (post, dp4) share a weight: summed over dp4, the
    # embedding's contribution (on 2 of the 4 ranks of that group per part) halved
    assert layout.param_axes["tok_emb.weight"] == ("dp4", 4)
    (scale,) = _calls(ir, grad_scale)
    assert _layer(ir, scale) == "pre" and scale.args[1] == 0.5


def test_reshard_groups_nest_the_coarse_parts():
    # dp1 <-> dp2 on 4 ranks: the halves of the batch are on ranks {0,1} and {2,3} (tp2 groups)
    assert regroup_groups(4, 1, 2) == [[0, 2], [1, 3]]
    assert regroup_groups(4, 2, 4) == [[0, 1], [2, 3]]
    assert regroup_groups(4, 1, 4) == [[0, 1, 2, 3]]
    assert regroup_groups(8, 2, 4) == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_uniform_plan_is_left_alone():
    ir = _ir(Plan.uniform(dp=2, tp=2))
    assert ir.mixed_layout is None
    assert not any("reshard" in key for key in ir.op_counts())


def test_pipelined_mixed_plan_regroups_in_the_reading_stage():
    """pp2 with blocks.1 at dp2·tp1 on a dp1·tp2 default: the batch is sliced where blocks.1 reads
    blocks.0 and gathered where blocks.2 (the next stage) reads blocks.1, each in its reading layer,
    so each stage regroups what it received; the axes are the flat names of one stage's 2 ranks."""
    plan = dataclasses.replace(Plan(num_devices=4, default=Strategy(dp=1, tp=2), pp=2, layers=(
        LayerAssignment("blocks.0", Strategy(dp=1, tp=2), 0), LayerAssignment("blocks.1", Strategy(dp=2, tp=1), 0),
        *(LayerAssignment(layer, Strategy(dp=1, tp=2), 1) for layer in ("blocks.2", "blocks.3", "post")))),
        num_microbatches=2)
    ir = _ir(plan)
    assert [_layer(ir, n) for n in _calls(ir, batch_slice)] == ["blocks.1"]
    assert [_layer(ir, n) for n in _calls(ir, batch_gather)] == ["blocks.2"]
    assert {n.args[2] for n in _calls(ir, batch_slice) + _calls(ir, batch_gather)} == {"batch1:2"}
    assert ir.mixed_layout.param_axes["blocks.1.attn.q.weight"] == ("dp2", 2)


def test_pipelined_mixed_plan_needs_micro_batches_the_finest_dp_splits():
    plan = dataclasses.replace(Plan(num_devices=4, default=Strategy(dp=1, tp=2), pp=2,
                                    layers=(LayerAssignment("blocks.1", Strategy(dp=2, tp=1)),)), num_microbatches=8)
    with pytest.raises(PcompileError, match="does not split into 8 micro-batches for dp=2") as info:
        _ir(plan)  # 8 samples: 8 micro-batches of 1, which blocks.1's 2 ranks cannot split
    assert "multiple of 16" in info.value.fix


def test_pipelined_mixed_plan_with_expert_parallelism_is_refused():
    from pcompile.models import MoEGPT, moe_gpt_inputs
    from tests.distributed.ranks_moe import CFG as MOE

    plan = dataclasses.replace(Plan(num_devices=8, default=Strategy(dp=4, ep=2), pp=2,
                                    layers=(LayerAssignment("blocks.0", Strategy(dp=2, tp=2)),)), num_microbatches=2)
    with pytest.raises(PcompileError, match="expert parallelism in .*blocks.1.* groupings in a pipeline") as info:
        pcompile.compile(MoEGPT(MOE), pcompile.Cluster.local(8), moe_gpt_inputs(MOE, 8), plan=plan,
                         stop_after="reshard")
    assert "ep=1" in info.value.fix


LINEAR_FIRST = Plan(num_devices=4, default=Strategy(dp=4), layers=(LayerAssignment("blocks.1", Strategy(dp=2, tp=2)),))


def test_tp_copy_entering_a_layer_runs_after_the_reshard():
    ir = _ir(LINEAR_FIRST, LinearFirstModel(), (torch.randn(8, 8), torch.randn(8, 8)))
    copies = [n for n in _calls(ir, tp_copy) if _layer(ir, n) == "blocks.1"]
    assert len(copies) == 1 and copies[0].args[1:] == ("tp2", 2)
    (gather,) = _calls(ir, batch_gather)
    assert copies[0].args[0] is gather and _layer(ir, gather.args[0]) == "blocks.0"


def test_batch_size_crossing_a_dp_change_is_refused():
    with pytest.raises(PcompileError, match="depends on the batch"):
        _ir(LINEAR_FIRST, LinearFirstModel(pass_batch=True), (torch.randn(8, 8), torch.randn(8, 8)))
