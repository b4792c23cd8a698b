"""The tensor-parallel rewrite: explicit tp_copy / tp_reduce nodes (one pair per Megatron
column/row pair: 2 per GPT block), weights sharded along the right dims, row-parallel Linears
lowered to linear -> tp_reduce -> + bias, and the rank-local shapes checked on fake tensors."""
import pytest
import torch

import pcompile
from pcompile import Cluster, PcompileError, Plan
from pcompile.ir import IR, Shard
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from tests.toy import analyse, node, rows

COPY = "call_function:pcompile.runtime.collectives.tp_copy"
REDUCE = "call_function:pcompile.runtime.collectives.tp_reduce"


def _gpt_tp(tp: int, dp: int = 1, layers: int = 2, tie: bool = True) -> IR:
    cfg = GPTConfig(num_layers=layers, tie_head=tie)
    return analyse(GPT(cfg), gpt_inputs(cfg, 4), stop_after="tensor_parallel", devices=dp * tp,
                   plan=Plan.uniform(dp=dp, tp=tp))


def test_two_block_gpt_has_two_copies_and_two_reduces_per_block():
    ir = _gpt_tp(tp=2)
    counts = ir.op_counts()
    # + the LM head's input copy and the vocab-parallel embedding's reduce (tests/passes/test_vocab_parallel.py)
    assert counts[COPY] == 4 + 1 and counts[REDUCE] == 4 + 1
    assert "call_function:pcompile.runtime.collectives.tp_scatter" not in counts
    for block in ir.block_layers:
        ops = [n.target.__name__ for n in ir.nodes_of(block) if n.op == "call_function"
               and n.target.__module__ == "pcompile.runtime.collectives"]
        # attention: copy (q,k,v share it) ... reduce after proj; MLP: copy ... reduce after out
        assert ops == ["tp_copy", "tp_reduce", "tp_copy", "tp_reduce"]
    # the rewrite is visible in the text form
    r = rows(ir)
    assert r["tp_copy"][1:3] == ["call_function", "pcompile.runtime.collectives.tp_copy"] and r["tp_copy"][-1] == "R"
    assert r["blocks_0_attn_q"][-1] == "S(2)@tp"
    assert r["transpose"][-1] == "S(1)@tp"  # [b, heads, t, d]: heads split
    assert IR.parse(ir.format()) == [(n.name, n.op, r[n.name][2]) for n in ir.graph.nodes]


def test_row_parallel_linear_becomes_linear_reduce_add_bias():
    ir = _gpt_tp(tp=2)
    reduces = [n for n in ir.graph.nodes if n.op == "call_function" and n.target.__name__ == "tp_reduce"
               and n.args[0].target.__name__ == "linear"]
    weights = [r.args[0].args[1].target for r in reduces]
    assert weights == [f"blocks.{b}.{m}.weight" for b in (0, 1) for m in ("attn.proj", "mlp.out")]
    reduce = reduces[1]
    local = reduce.args[0]
    assert local.target.__name__ == "linear"
    assert reduce.args[1:] == ("tp", 2)
    (add,) = reduce.users
    assert add.args[1].target == "blocks.0.mlp.out.bias"
    assert [str(ir.meta(n).placement) for n in (local, reduce, add)] == ["P@tp", "R", "R"]
    assert not any(n.op == "call_module" and n.target == "blocks.0.mlp.out" for n in ir.graph.nodes)
    # the partial-sum node keeps the original Linear's cost
    assert ir.meta(local).flops == 2 * 4 * 32 * 256 * 64


def test_parameter_shardings():
    ir = _gpt_tp(tp=2)
    column = Shard("tp", 0, 2)
    row = Shard("tp", 1, 2)
    for b in (0, 1):
        for name in ("attn.q", "attn.k", "attn.v", "mlp.fc"):
            assert ir.param_shardings[f"blocks.{b}.{name}.weight"] == column
            assert ir.param_shardings[f"blocks.{b}.{name}.bias"] == column
        for name in ("attn.proj", "mlp.out"):
            assert ir.param_shardings[f"blocks.{b}.{name}.weight"] == row
            assert f"blocks.{b}.{name}.bias" not in ir.param_shardings  # added after the reduce
    assert len(ir.param_shardings) == 2 * (8 + 2) + 2  # + the tied vocab table under its two names
    assert not any(k.startswith(("pos_emb", "ln")) or ".ln" in k for k in ir.param_shardings)


def test_tp4_on_four_heads_and_dp_tp_mesh():
    ir = _gpt_tp(tp=4, layers=2)
    assert ir.param_shardings["blocks.1.attn.q.weight"] == Shard("tp", 0, 4)
    assert ir.op_counts()[COPY] == 4 + 1  # + the LM head's
    ir = _gpt_tp(tp=2, dp=2, layers=3, tie=False)
    assert ir.op_counts()[COPY] == 6 + 1 and ir.op_counts()[REDUCE] == 6 + 1  # + LM head, + embedding
    # untied head: split over the vocabulary on its own, as the embedding table
    assert ir.param_shardings["head.weight"] == ir.param_shardings["tok_emb.weight"] == Shard("tp", 0, 2)


def test_views_divide_the_head_count_and_shape_queries_stay_global():
    ir = _gpt_tp(tp=2)
    view = node(ir, "view")  # q.view(batch, length, heads, head_dim)
    assert view.args[3] == 2  # the constant 4 heads, halved
    merge = node(ir, "view_3")  # y.view(batch, length, width): width is a traced size, divided by tp
    width = merge.args[3]
    assert isinstance(width, torch.fx.Node) and width.target.__name__ == "floordiv" and width.args[1] == 2


def test_mlp_model_rewrite():
    cfg = MLPConfig(num_layers=2)
    ir = analyse(MLPModel(cfg), mlp_inputs(cfg, 4), stop_after="tensor_parallel", devices=2,
                 plan=Plan.uniform(tp=2))
    assert ir.op_counts()[COPY] == 2 + 1 and ir.op_counts()[REDUCE] == 2  # + the classifier's copy
    assert ir.param_shardings["blocks.0.up.weight"] == Shard("tp", 0, 2)
    assert ir.param_shardings["blocks.0.down.weight"] == Shard("tp", 1, 2)


def test_tp1_leaves_the_graph_unchanged():
    cfg = GPTConfig(num_layers=2)
    model = GPT(cfg)
    before = analyse(model, gpt_inputs(cfg, 4), stop_after="normalise_loss", devices=2, plan=Plan.uniform(dp=2))
    after = analyse(model, gpt_inputs(cfg, 4), stop_after="tensor_parallel", devices=2, plan=Plan.uniform(dp=2))
    assert after.format() == before.format() and after.param_shardings == {}


def test_rewritten_graph_keeps_every_node_annotated_and_layered():
    ir = _gpt_tp(tp=2)
    for n in ir.graph.nodes:
        assert IR.has_meta(n), n.name
        assert ir.meta(n).layer in ir.layers, n.name
    assert ir.total("param_bytes") == 4 * sum(p.numel() for p in GPT(GPTConfig()).parameters())


def test_forced_tp_that_cannot_split_raises():
    cfg = GPTConfig(num_layers=2)
    with pytest.raises(PcompileError, match="tp=3 cannot split blocks.0"):
        analyse(GPT(cfg), gpt_inputs(cfg, 3), stop_after="tensor_parallel", devices=3, plan=Plan.uniform(tp=3))


def test_compile_without_process_group_returns_an_unlowered_model():
    cfg = GPTConfig(num_layers=2)
    cm = pcompile.compile(GPT(cfg), Cluster.local(2), gpt_inputs(cfg, 4), plan=Plan.uniform(tp=2))
    assert cm.plan.default.tp == 2
    with pytest.raises(PcompileError, match="planned but not lowered"):
        cm.parameters()
