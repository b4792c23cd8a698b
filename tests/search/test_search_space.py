"""Pruning rules, the objective against the pipeline simulator, balanced stages on uneven
clusters, and the explanation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcompile.search.costtable import CostTable
from pcompile.search.engine import SearchProblem, search
from pcompile.search.schedules import StageCost, simulate
from pcompile.search.space import SearchRules, SearchSpace, Setting, strategies_for
from pcompile.search.space import settings as all_settings
from tests.search.tables import RandomCosts

LAYERS = ("pre",) + tuple(f"blocks.{i}" for i in range(8)) + ("post",)


def test_rules_prune_what_they_say():
    space = SearchSpace()
    on, off = SearchRules(), SearchRules(tp_within_node=False, split_only_with_sdp=False)
    assert max(s.tp for s in strategies_for(16, 8, 64, space, on)) == 8
    assert max(s.tp for s in strategies_for(16, 8, 64, space, off)) == 16
    assert all(s.sdp for s in strategies_for(8, 8, 64, space, on) if s.split > 1)
    assert any(not s.sdp and s.split > 1 for s in strategies_for(8, 8, 64, space, off))
    # never duplicates: sp needs tp > 1, sdp needs dp > 1, dp divides the micro-batch
    for s in strategies_for(8, 8, 4, space, off):
        assert (s.tp > 1 or not s.sp) and (s.dp > 1 or not s.sdp) and 4 % s.dp == 0
    blocks = ("pre",) + ("b",) * 8 + ("post",)
    pruned = all_settings(16, 8, 32, blocks, space, on)
    assert {s.pp for s in pruned} == {1, 2}  # two nodes: pp across nodes only
    assert "GPipe" not in {s.schedule for s in pruned}
    assert all(s.microbatches >= s.pp for s in pruned)
    free = all_settings(16, 8, 32, blocks, space, SearchRules(pp_across_nodes=False, gpipe_dominated=False,
                                                               microbatches_at_least_pp=False))
    assert {s.pp for s in free} == {1, 2, 4, 8} and "GPipe" in {s.schedule for s in free}
    assert all(8 % (s.pp * s.chunks) == 0 for s in free if s.chunks > 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 12), st.lists(st.floats(0.1, 2.0), min_size=6, max_size=6),
       st.sampled_from(["GPipe", "1F1B"]))
def test_objective_against_the_pipeline_simulation(pp, m, times, schedule):
    """Without gradient sync, max_k (m + pp - 1) T_k bounds the simulated step from above (sends
    included) and equals it for equal stages. With sync it stays below c max_k T_k + max_k S_k;
    the objective max_k (c T_k + S_k) can be below the simulation when a stage that is not the
    slowest has the largest sync (its sync starts only after the drain; a known gap)."""
    setting = Setting(pp, m, schedule)
    c = setting.coefficient
    stages = [StageCost(fwd=times[k] / 3, bwd=2 * times[k] / 3, send=0.01) for k in range(pp)]
    assert simulate(schedule, stages, m).step_time <= c * max(s.fwd + s.bwd + 2 * s.send for s in stages) * (1 + 1e-9)
    assert simulate(schedule, [StageCost(fwd=1.0, bwd=2.0)] * pp, m).step_time == pytest.approx(c * 3.0)
    synced = [StageCost(fwd=s.fwd, bwd=s.bwd, send=s.send, sync=times[-1] * (k % 2)) for k, s in enumerate(stages)]
    T = [s.fwd + s.bwd + 2 * s.send for s in synced]
    simulated = simulate(schedule, synced, m).step_time
    assert simulated <= (c * max(T) + max(s.sync for s in synced)) * (1 + 1e-9)


def _uneven(query, speed, memory):
    """One strategy; stage 1's devices `speed` x faster; every layer weighs 1 unit of state."""
    L, S = len(LAYERS), len(query.strategies)
    t = np.array([0.5] + [1.0] * 8 + [0.5])[:, None] * np.ones((1, S)) / (speed if query.stage == 1 else 1.0)
    return CostTable(LAYERS, query.strategies, query.devices_per_stage, query.microbatch_size, t / 3, 2 * t / 3,
                     np.zeros((L, S)), np.ones((L, S)), np.zeros((L, S)), np.zeros((L, S)),
                     np.zeros((L - 1, S, S)), np.zeros(L - 1))


@pytest.mark.parametrize("speed, memory, stage0_layers", [(2.0, (9.0, 9.0), 3), (1.0, (3.0, 9.0), 3)])
def test_stages_balance_time_and_memory_not_layer_counts(speed, memory, stage0_layers):
    """Stage 1 twice as fast: it takes twice the blocks (pre + 2 | 6 + post). Stage 0 with a
    third of the memory: it takes what fits (pre + 2). The even split is slower or does not fit."""
    space = SearchSpace(tp_degrees=(1,), pp_degrees=(2,), microbatch_counts=(2,), schedules=("1F1B",),
                        splits=(1,), sdp=(False,), sp=(False,), checkpoint=(False,))
    problem = SearchProblem(LAYERS, 4, 2, 4, lambda q: _uneven(q, speed, memory),
                            (memory[0],) * 2 + (memory[1],) * 2, space=space)
    result = search(problem)
    assert len(result.stages[0].layers) == stage0_layers
    assert all(s.peak_memory <= s.memory_budget for s in result.stages)
    even = next(b for b in result.baselines if b.name == "pipeline_even")
    assert not even.fits or even.step_time > result.step_time * 1.1


def test_explain_names_every_layer_baseline_and_binding_constraint():
    layers = ("pre", "blocks.0", "blocks.1", "post")
    problem = SearchProblem(layers, 4, 4, 8, RandomCosts(layers, 7), (14.0,) * 4, p2p_bandwidth=1e10,
                            space=SearchSpace(splits=(1,)))
    result = search(problem)
    text = result.explain()
    for name in layers + ("dp", "zero3", "megatron", "uniform_3d", "pipeline_even", "memory"):
        assert name in text
    assert result.layers[0].runner_ups and all(a.fits for c in result.layers for a in c.runner_ups)
    for b in result.baselines:
        assert not b.fits or result.gain(b.name) >= 1 - 1e-9
