"""Sequence parallelism in the search: chosen where the sp rewrite accepts the layer and it
pays, never on a layer the rewrite refuses, and a searched sp plan compiles."""
from __future__ import annotations

import torch.distributed as dist

import pcompile
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.sharding.sp_rules import sp_refusals
from tests.cost.conftest import analyse
from tests.distributed.ranks import train_side_by_side

# hidden 128: sp's per-parameter gradient all-reduces (6 a block, latency-bound) are priced too,
# so its activation savings must outweigh them
GPT_CFG = GPTConfig(num_layers=2, hidden=128, seq_len=128)
TIGHT = 5 * 2**20  # activations must shrink: the search picks sp
# without pipelining, ZeRO-3 and ZeRO-2 (which shrink the states and gradients instead: on this
# tiny model their collectives are cheaper than sp's)
NO_PP_NO_ZERO = {"pp_degrees": (1,), "sdp": (False,), "zero2": (False,)}


# a pipeline under tighter memory: sp inside its stages
PIPELINED = (3 * 2**20, {"pp_degrees": (2,), "sdp": (False,), "zero2": (False,)})


def searched_sp_vs_serial(cases=((TIGHT, NO_PP_NO_ZERO), PIPELINED), steps: int = 3) -> list[dict]:
    """On each rank: the plan searched under each (memory, space) trains next to the serial model."""
    out = []
    for memory, space in cases:
        cluster = pcompile.Cluster.local(dist.get_world_size(), memory_bytes=memory)

        def search(model, cluster, inputs, space=space):
            return pcompile.plan(model, cluster, inputs, search_space=space)

        cm, _, loss_diff, grad_diff, _ = train_side_by_side(
            lambda: GPT(GPT_CFG), lambda seed: gpt_inputs(GPT_CFG, 8, seed), search, steps, 1e-3, cluster)
        plan = cm.plan
        out.append({"sp": [a.layer for a in plan.layers if a.strategy.sp], "pp": plan.pp,
                    "loss_diff": loss_diff, "grad_diff": grad_diff})
    return out


def test_gpt_plan_uses_sp_and_compiles():
    model, inputs = GPT(GPT_CFG), gpt_inputs(GPT_CFG, 8)
    cluster = pcompile.Cluster.local(4, memory_bytes=TIGHT)
    plan = pcompile.plan(model, cluster, inputs, search_space=NO_PP_NO_ZERO)
    sp = [a.layer for a in plan.layers if a.strategy.sp]
    assert "blocks.0" in sp and "blocks.1" in sp
    ir = pcompile.compile(model, cluster, inputs, plan=plan, stop_after="sequence_parallel")
    counts = ir.op_counts()
    assert counts.get("call_function:pcompile.runtime.collectives.sp_reduce_scatter", 0) >= 2 * len(sp) - 2


def test_searched_sp_plans_train_like_serial_with_and_without_pipelining():
    for rank in pcompile.launch(searched_sp_vs_serial, 4):
        (flat, pipelined) = rank
        assert flat["pp"] == 1 and pipelined["pp"] == 2, rank
        for r in rank:
            assert r["sp"] and r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r


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
