"""The engine runs of one search (passes/search_runs.py): tied layers found and pinned, one
mixed run per tp of each tied group, pins respected by the searched plan, and mixing never
loses to the uniform runs (it only reports a plan when it is faster)."""
import dataclasses

import numpy as np

import pcompile
from pcompile import Cluster
from pcompile.cost.pricing import CostOptions
from pcompile.cost.stage_costs import StageCosts
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.passes.search_runs import MAX_MIXED_RUNS, _restricted, cost_callback, engine_runs, mixed_pins, tied_groups
from pcompile.plan import Strategy
from pcompile.search.engine import StageQuery
from tests.cost.conftest import analyse
from tests.search.tables import RandomCosts

TIED = GPTConfig(vocab_size=128, seq_len=32, hidden=64, num_heads=4, num_layers=2)
UNTIED = GPTConfig(vocab_size=128, seq_len=32, hidden=64, num_heads=4, num_layers=2, tie_head=False)


def _ir(cfg):
    ir, _ = analyse(GPT(cfg), gpt_inputs(cfg, 8))
    return ir


def test_tied_embedding_and_head_form_one_group():
    assert tied_groups(_ir(TIED), ("pre", "blocks.0", "blocks.1", "post")) == [("pre", "post")]
    assert tied_groups(_ir(UNTIED), ("pre", "blocks.0", "blocks.1", "post")) == []
    assert tied_groups(_ir(TIED), ("blocks.0", "blocks.1", "post")) == []  # "pre" left out: no pair


def test_one_mixed_run_per_tp_of_each_group():
    assert mixed_pins([1, 2, 4], []) == [{}]
    assert mixed_pins([1, 2, 4], [("pre", "post")]) == [{"pre": t, "post": t} for t in (1, 2, 4)]
    assert len(mixed_pins([1, 2], [("a", "b"), ("c", "d")])) == 4
    assert mixed_pins([4], [("pre", "post")]) == []  # one tp: nothing to mix
    assert mixed_pins([2, 3], []) == []  # dp = 6 / 2 and 6 / 3 cannot regroup into each other
    many = mixed_pins([1, 2, 4, 8], [("a", "b"), ("c", "d"), ("e", "f")])  # 64 > MAX_MIXED_RUNS
    assert len(many) == 4 <= MAX_MIXED_RUNS and all(len(set(p.values())) == 1 for p in many)


def test_pinned_layers_cannot_take_another_tp():
    strategies = (Strategy(dp=4), Strategy(dp=2, tp=2), Strategy(dp=2, tp=2, sp=True), Strategy(dp=1, tp=4))
    table = RandomCosts(("pre", "blocks.0", "post"), seed=0, inf_rate=0.0)(StageQuery(1, 0, 0, 4, 8, strategies))
    out = _restricted(table, {2: {"blocks.0": "no sequence"}}, False, {"pre": 2, "post": 2}, dp_one=False)
    possible = np.isfinite(out.fwd_time + out.bwd_time)
    assert possible.tolist() == [[False, True, True, False],  # pre: pinned to tp 2
                                 [True, True, False, True],  # blocks.0: sp refused at tp 2
                                 [False, True, True, False]]  # post: pinned to tp 2
    summed = _restricted(table, {}, False, {}, dp_one=True)
    assert np.isfinite(summed.fwd_time).tolist() == [[False, False, False, True]] * 3


def test_pipelines_take_sp_and_zero3_with_tp_on_every_layer():
    """A pipelined stage's table keeps sp and ZeRO-3 x tp possible on every layer, the tied
    embedding / LM head included (the pipeline backend sums their chunks over the pp ranks:
    tests/distributed/test_pipeline.py runs pp2·sdp2·tp2 on the tied GPT)."""
    ir = _ir(TIED)
    costs = StageCosts(ir, Cluster.local(8), CostOptions.runtime())
    strategies = (Strategy(dp=4), Strategy(dp=2, tp=2, sp=True), Strategy(dp=2, tp=2, sdp=True))
    table = cost_callback(ir, costs, {}, dp_one=False)({})(StageQuery(2, 1, 4, 4, 4, strategies))
    assert table.layers[0] == "pre" and table.layers[-1] == "post", table.layers  # both read tok_emb.weight
    assert np.isfinite(table.fwd_time + table.bwd_time).all(), table.fwd_time


def test_mixed_runs_take_pipelines():
    """Per-layer tp mixing is searched with pp > 1 too (passes/reshard.py lowers it in pipeline
    stages: tests/distributed/test_pipeline.py runs searched and forced mixed pipelines)."""
    layers = ("pre", "blocks.0", "blocks.1", "post")
    runs = engine_runs(_ir(TIED), {"pp_degrees": (2,)}, [1, 2, 4], layers, dp_one=False)
    mixed = [(fields, pins) for fields, pins, is_mixed in runs if is_mixed]
    assert [pins for _, pins in mixed] == [{"pre": t, "post": t} for t in (1, 2, 4)]  # the tied pair pinned
    assert all(f["pp_degrees"] == (2,) and f["tp_degrees"] == (1, 2, 4) and f["sp"] == (False,) for f, _ in mixed)


# a large vocabulary and short sequences: untied, the embedding and the LM head want different tp
BIG_VOCAB = {"vocab_size": 8192, "seq_len": 8, "hidden": 64, "num_heads": 4, "num_layers": 2}


def test_searched_plan_keeps_tied_layers_together_and_never_loses_to_uniform_runs():
    for tie in (True, False):
        cfg = GPTConfig(**BIG_VOCAB, tie_head=tie)
        cluster = Cluster.local(4)
        mixed = pcompile.plan(GPT(cfg), cluster, gpt_inputs(cfg, 8), search_space={"pp_degrees": (1,)})
        tps = {a.layer: a.strategy.tp for a in mixed.layers}
        # the pin binds: free, the two ends take different tp; tied, one
        assert (tps["pre"] == tps["post"]) == tie, str(mixed)
        for tp in (1, 2, 4):  # every uniform run on its own
            uniform = pcompile.plan(GPT(cfg), cluster, gpt_inputs(cfg, 8),
                                    search_space={"pp_degrees": (1,), "tp_degrees": (tp,)})
            assert mixed.estimate.step_time <= uniform.estimate.step_time, (str(mixed), str(uniform))


def test_a_run_where_nothing_fits_still_reports_its_baselines():
    """At 1 MiB no uniform tp=1 plan fits (that run fails); its dp baseline is still reported as
    out of memory, with the leanest peak, rather than as outside the searched space."""
    from tests.distributed.ranks import MODELS

    build, inputs = MODELS["mlp"]
    plan = pcompile.plan(build(), Cluster.local(4, memory_bytes=2**20), inputs(0),
                         search_space={"pp_degrees": (1,), "sdp": (False,)})
    verdicts = {c.verdict.split(":")[0]: c.verdict for c in plan.candidates}
    assert verdicts["baseline dp"].startswith("baseline dp: out of memory (leanest needs"), verdicts
    assert "not in the searched space" in verdicts["baseline zero3"]  # excluded by the user


def test_runs_bounded_by_the_best_so_far_lose_no_plan_and_no_baseline():
    """The uniform runs after the first look only for faster plans (passes/search.py _search_at):
    the plan is the best of the runs each searched alone, and each baseline family the best of
    theirs (a bounded run still prices its baselines; pipeline_even only where it is faster)."""
    from pcompile.passes.search import searched_plan

    cfg = GPTConfig(**BIG_VOCAB)
    ir, ctx = analyse(GPT(cfg), gpt_inputs(cfg, 8))
    _, together = searched_plan(ir, ctx)
    alone = []
    for tp in (1, 2, 4):
        ctx.options = dataclasses.replace(ctx.options, search_space=(("tp_degrees", (tp,)),))
        alone.append(searched_plan(ir, ctx)[1])
    assert together.step_time <= min(r.step_time for r in alone)
    best = {b.name: min((r for a in alone for r in a.baselines if r.name == b.name),
                        key=lambda r: (r.step_time, r.peak_memory)) for b in together.baselines}
    assert {b.name: (b.step_time, b.peak_memory) for b in together.baselines} == \
        {name: (b.step_time, b.peak_memory) for name, b in best.items()}
    assert sum(np.isfinite(b.step_time) for b in together.baselines) >= 4, together.baselines
