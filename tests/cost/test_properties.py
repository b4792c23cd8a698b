"""Property tests of the cost model (hypothesis) and the symbolic formulas against re-analysis."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pcompile
from pcompile.cost.pricing import CostOptions, cost_table
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.passes.symbolic import evaluate, layer_formulas
from pcompile.plan import Strategy
from tests.cost.conftest import analyse

options_st = st.builds(CostOptions, optimizer=st.sampled_from(["adam", "momentum", "sgd"]),
                       mixed_precision=st.booleans())


def _total(table, layer: int, j: int) -> float:
    return table.state_memory[layer, j] + table.activation_memory[layer, j] + table.temp_memory[layer, j]


@settings(max_examples=25, deadline=None)
@given(microbatch=st.sampled_from([8, 16, 64]), options=options_st, checkpoint=st.booleans(),
       split=st.sampled_from([1, 2, 4]), tp=st.sampled_from([1, 2]))
def test_memory_never_increases_as_sdp_degree_grows(gpt_ir, microbatch, options, checkpoint, split, tp):
    """Sharding over more ranks never costs memory; against no sharding (dp = 1) the states and
    activations shrink, while ZeRO-3's transient (the gathered unit and its neighbours' collectives
    in flight, pcompile.runtime.sdp) may outweigh the saving on one small layer, as it does at run time."""
    ir, _ = gpt_ir
    cluster = pcompile.Cluster.preset("8xA100-80GB")
    previous = held = None
    for dp in (1, 2, 4):
        devices = dp * tp
        table = cost_table(ir, cluster, devices, microbatch,
                           [Strategy(dp=dp, tp=tp, sdp=dp > 1, checkpoint=checkpoint, split=split)], options)
        totals = [_total(table, i, 0) for i in range(table.num_layers)]
        kept = [table.state_memory[i, 0] + table.activation_memory[i, 0] for i in range(table.num_layers)]
        if held is not None:
            assert all(k <= h + 1e-6 for k, h in zip(kept, held)), (dp, kept, held)
        if previous is not None and dp > 2:
            assert all(t <= p + 1e-6 for t, p in zip(totals, previous)), (dp, totals, previous)
        previous, held = totals, kept


@settings(max_examples=25, deadline=None)
@given(microbatch=st.sampled_from([4, 8, 32]), options=options_st, sdp=st.booleans(),
       split=st.sampled_from([1, 2]), dp_tp=st.sampled_from([(4, 1), (2, 2), (1, 4)]), sp=st.booleans())
def test_checkpointing_never_increases_activation_memory(gpt_ir, microbatch, options, sdp, split, dp_tp, sp):
    ir, _ = gpt_ir
    dp, tp = dp_tp
    sp = sp and tp > 1
    base = dict(dp=dp, tp=tp, sdp=sdp, sp=sp, split=split)
    table = cost_table(ir, pcompile.Cluster.local(4), 4, microbatch,
                       [Strategy(**base), Strategy(**base, checkpoint=True)], options)
    assert (table.activation_memory[:, 1] <= table.activation_memory[:, 0]).all()
    assert (table.bwd_time[:, 1] >= table.bwd_time[:, 0]).all()  # recompute costs time


@settings(max_examples=20, deadline=None)
@given(microbatch=st.integers(min_value=1, max_value=256))
def test_table_scales_with_the_micro_batch_as_the_formula_says(gpt_ir, microbatch):
    ir, ctx = gpt_ir
    formulas = layer_formulas(ir)
    table = cost_table(ir, pcompile.Cluster.local(1), 1, microbatch, [Strategy()])
    for i, layer in enumerate(table.layers):
        if layer.startswith("blocks."):
            assert table.activation_memory[i, 0] == pytest.approx(evaluate(formulas[layer]["activation"],
                                                                           microbatch, 32), rel=1e-12)


def test_formulas_match_a_fresh_analysis_at_another_shape(gpt_ir):
    ir, _ = gpt_ir
    formulas = layer_formulas(ir)
    assert str(formulas["blocks.0"]["flops"]) == "256*b*s**2 + 98304*b*s"  # attention b s^2, Linears b s
    batch, seq = 3, 12
    cfg = GPTConfig()
    fresh, _ = analyse(GPT(cfg), tuple(t[:, :seq] for t in gpt_inputs(cfg, batch)))
    for layer in fresh.layers:
        assert evaluate(formulas[layer]["flops"], batch, seq) == fresh.total("flops", layer)
        assert evaluate(formulas[layer]["bytes"], batch, seq) == fresh.total("output_bytes", layer)
        assert evaluate(formulas[layer]["activation"], batch, seq) == fresh.total("saved_bytes", layer)
    node = next(n for n in ir.graph.nodes if n.name == "blocks_0_mlp_fc")
    assert str(ir.meta(node).formulas["flops"]) == "32768*b*s"  # 2 * 64 * 256 per token
    assert ir.meta(node).flops == 32768 * 8 * 32  # the real metadata was restored
