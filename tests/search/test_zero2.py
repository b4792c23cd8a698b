"""ZeRO-2 (Strategy.zero2) as data, in the cost model and in the search: the Strategy's checks,
text and JSON; the layer price the cost model's docstring states (parameters whole, gradients
and optimizer states / dp, the reduce-scatter exposed as dp's all-reduce and the all-gather
not overlapped); the search space lists it; and the search picks it where plain dp does not
fit and ZeRO-3's per-step gathers cost more, and not where dp fits."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import pcompile
from pcompile.cost.layer_work import layer_work
from pcompile.cost.pricing import CostOptions, layer_cost
from pcompile.errors import PcompileError
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import Plan, Strategy
from pcompile.search.space import SearchRules, SearchSpace, strategies_for
from tests.cost.conftest import OneLinear, analyse


def test_strategy_zero2_checks_text_and_json():
    plan = Plan.uniform(dp=4, zero2=True)
    assert plan.default.describe() == "z2dp4·tp1"
    assert Strategy(dp=2, tp=2, zero2=True, checkpoint=True).describe() == "z2dp2·tp2·ckpt"
    assert Plan.from_json(plan.to_json()) == plan and Plan.from_json(plan.to_json()).default.zero2
    old = plan.to_dict()
    del old["default"]["zero2"]  # a plan written before the field existed: plain dp
    assert not Plan.from_dict(old).default.zero2
    for bad, cause in ((dict(dp=4, zero2=True, sdp=True), "exclusive"), (dict(dp=1, zero2=True), "dp > 1"),
                       (dict(dp=2, zero2=1), "true or false")):
        with pytest.raises(PcompileError, match=cause):
            Strategy(**bad)


def test_search_space_offers_zero2_beside_dp_and_sdp():
    rules = SearchRules()
    found = strategies_for(4, 4, 8, SearchSpace(sp=(False,), checkpoint=(False,), splits=(1,)), rules)
    assert {s.describe() for s in found} == {"dp4·tp1", "sdp4·tp1", "z2dp4·tp1", "dp2·tp2", "sdp2·tp2", "z2dp2·tp2",
                                            "dp1·tp4"}
    narrowed = strategies_for(4, 4, 8, SearchSpace(zero2=(False,)), rules)
    assert narrowed and not any(s.zero2 for s in narrowed)


def test_zero2_layer_price():
    ir = analyse(OneLinear(64, 64), (torch.randn(8, 64), torch.randn(8, 64)))[0]
    work = next(w for w in layer_work(ir, 1).values() if sum(w.param_numels))
    cluster = pcompile.Cluster.local(4)
    options = CostOptions.runtime()
    dp, z2 = (layer_cost(work, cluster, Strategy(dp=4, zero2=zero2), 8, 8, options) for zero2 in (False, True))
    elements = sum(work.param_numels)
    assert z2.memory.params == dp.memory.params == elements * 4  # replicated
    assert z2.memory.grads == dp.memory.grads / 4
    assert z2.memory.optimizer == elements * (8 + 4) / 4  # Adam's moments and the fp32 chunk, / dp
    assert z2.fwd == dp.fwd and z2.bwd == dp.bwd  # nothing in forward or backward: all in sync
    bucket = options.bucket_bytes
    group = [[0, 1, 2, 3]]
    scatter = elements * 4 / bucket * cluster.collective_time("reduce_scatter", bucket, group)
    gather = elements * 4 / bucket * cluster.collective_time("all_gather", bucket, group)
    exposed = scatter - cluster.overlap * min(scatter, z2.bwd)  # overlapped as dp's all-reduce is
    copies = 4 * elements * 4 / cluster.device_of(0).memory_bandwidth
    assert math.isclose(z2.sync, exposed + gather + copies)
    # its own full gradients as backward makes them, and two buckets' rows in flight beyond the
    # activations of the layer backward finished before (one's own, as for the neighbours' sizes)
    assert z2.memory.temp - dp.memory.temp == elements * 4 + max(2 * elements * 4 - z2.memory.activations, 0)
    assert z2.memory.grads_in_backward and not dp.memory.grads_in_backward
    mixed = layer_cost(work, cluster, Strategy(dp=4, zero2=True), 8, 8, CostOptions.runtime(mixed_precision=True))
    assert mixed.memory.optimizer == elements * (4 + 8 / 4 + 4 / 4)  # fp32 masters stay whole


def test_zero2_under_accumulation_holds_every_full_gradient():
    """With several micro-batches per step ZeRO-2 reduce-scatters after the last one
    (pcompile.runtime.zero2: each parameter's expected accumulations, backends/pipeline.py): until
    then its layers hold their full gradients, as dp does, and the price says so - the table of a
    setting with m > 1, and a plan's price (GPT-3 175B's pinned plan was 43 GB per rank short)."""
    ir = analyse(OneLinear(64, 64), (torch.randn(8, 64), torch.randn(8, 64)))[0]
    work = next(w for w in layer_work(ir, 1).values() if sum(w.param_numels))
    cluster = pcompile.Cluster.local(4)
    one, many = (layer_cost(work, cluster, Strategy(dp=4, zero2=True), 8, 8, CostOptions(accumulating=a))
                 for a in (False, True))
    plain = layer_cost(work, cluster, Strategy(dp=4), 8, 8, CostOptions(accumulating=True))
    assert many.memory.grads == plain.memory.grads == 4 * one.memory.grads
    assert many.memory.optimizer == one.memory.optimizer  # the states stay sharded
    assert one.memory.grads_in_backward and not many.memory.grads_in_backward  # from the first micro-batch on
    assert many.memory.temp == one.memory.temp - 4 * one.memory.grads  # the full gradients: in grads now
    sharded = layer_cost(work, cluster, Strategy(dp=4, sdp=True), 8, 8, CostOptions(accumulating=True))
    assert sharded.memory.grads == plain.memory.grads / 4  # ZeRO-3 reduce-scatters every micro-batch

    from pcompile.cost.plan_price import _tables
    from pcompile.cost.stage_costs import StageCosts

    cfg = GPTConfig(num_layers=2, hidden=64, num_heads=4, seq_len=32)
    model, inputs = GPT(cfg), gpt_inputs(cfg, 16)
    ir = pcompile.compile(model, cluster, inputs, plan=Plan.uniform(dp=4), stop_after="layers")
    costs, z2 = StageCosts(ir, cluster, CostOptions.runtime()), Strategy(dp=4, zero2=True)
    states = [_tables(ir, costs, dataclasses.replace(Plan.uniform(dp=4, zero2=True), num_microbatches=m), 8, (z2,))[0]
              .state_memory[:, 0].sum() for m in (1, 2)]  # the micro-batch size alike: only m differs
    grads = sum(p.numel() for p in model.parameters()) * 4
    # m = 1: the shards' gradients come in backward (charged with the activations); m = 2: every
    # full gradient from the first micro-batch on
    assert math.isclose(states[1] - states[0], grads, rel_tol=0.02), (states, grads)


@pytest.fixture(scope="module")
def workload():
    """A GPT whose Adam states do not fit beside dp's replicas at 700 MiB on two 8-GPU nodes,
    where every ZeRO collective crosses InfiniBand and the compute is short."""
    cfg = GPTConfig(num_layers=4, hidden=1024, num_heads=8, vocab_size=8192, seq_len=128)
    with torch.device("meta"):
        model = GPT(cfg)
    return model, tuple(t.to("meta") for t in gpt_inputs(cfg, 16)), pcompile.Cluster.preset("2x8xH100-80GB")


def _plan(workload, mib: int, **space) -> Plan:
    model, inputs, cluster = workload
    return pcompile.plan(model, cluster.with_memory(mib * 2**20), inputs,
                         search_space={"tp_degrees": (1,), "pp_degrees": (1,), **space})


def test_search_picks_zero2_where_dp_does_not_fit_and_zero3_is_slower(workload):
    tight = _plan(workload, 700)
    without = _plan(workload, 700, zero2=(False,))
    zero2 = [a.layer for a in tight.layers if a.strategy.zero2]
    assert len(zero2) >= 3, tight  # the blocks; the rest stays dp or ZeRO-3 as memory allows
    assert not any(a.strategy.zero2 for a in without.layers)
    assert tight.estimate.step_time < 0.9 * without.estimate.step_time  # 13.4 vs 15.6 ms
    assert tight.estimate.peak_memory <= 700 * 2**20
    model, inputs, cluster = workload
    priced = pcompile.estimate(model, cluster.with_memory(700 * 2**20), inputs, tight)
    assert math.isclose(priced.step_time, tight.estimate.step_time, rel_tol=1e-9)
    roomy = _plan(workload, 80 * 1024)  # dp fits: its overlapped all-reduce beats ZeRO-2's gather
    assert not any(a.strategy.zero2 for a in roomy.layers) and not roomy.default.zero2
