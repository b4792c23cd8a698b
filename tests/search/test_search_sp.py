"""Sequence parallelism in the search: chosen where the sp rewrite accepts the layer and it
pays, never on a layer the rewrite refuses, and a searched sp plan compiles."""
from __future__ import annotations

import pcompile
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.passes.search import sp_refusals
from tests.cost.conftest import analyse

GPT_CFG = GPTConfig(num_layers=2, hidden=64, seq_len=128)


def test_gpt_plan_uses_sp_and_compiles():
    model, inputs = GPT(GPT_CFG), gpt_inputs(GPT_CFG, 8)
    cluster = pcompile.Cluster.local(4, memory_bytes=3 * 2**20)  # tight: activations must shrink
    plan = pcompile.plan(model, cluster, inputs, search_space={"pp_degrees": (1,)})
    sp = [a.layer for a in plan.layers if a.strategy.sp]
    assert "blocks.0" in sp and "blocks.1" in sp
    ir = pcompile.compile(model, cluster, inputs, plan=plan, stop_after="sequence_parallel")
    counts = ir.op_counts()
    assert counts.get("call_function:pcompile.collectives.sp_reduce_scatter", 0) >= 2 * len(sp) - 2


def test_sp_only_without_pipelining():
    plan = pcompile.plan(GPT(GPT_CFG), pcompile.Cluster.local(4), gpt_inputs(GPT_CFG, 8),
                         search_space={"pp_degrees": (2,)})
    assert plan.pp == 2 and not any(a.strategy.sp for a in plan.layers)


def test_sp_never_on_refused_layers():
    cfg = MLPConfig(width=64, hidden=256, num_layers=2)
    model, inputs = MLPModel(cfg), mlp_inputs(cfg, 8)
    ir, _ = analyse(model, inputs)
    refused = sp_refusals(ir, 2)
    assert {"blocks.0", "blocks.1"} <= set(refused) and "sequence" in refused["blocks.0"]
    for memory in (None, 2**20):
        plan = pcompile.plan(model, pcompile.Cluster.local(4, memory_bytes=memory), inputs,
                             search_space={"tp_degrees": (2, 4), "pp_degrees": (1,)})
        assert plan.default.tp > 1 and not any(a.strategy.sp for a in plan.layers)
