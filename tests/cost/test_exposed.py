"""Communication priced beside compute (pcompile.cost.pricing._exposed): a transfer's own work
overlaps at the cluster's efficiency eta, a wait beyond it (Cluster.min_transfer, as
pcompile.runtime.latency.inject makes one: no CPU) hides wholly; and in ZeRO-3's backward a
unit's reduce-scatter waits while the unit before it re-gathers, at once."""
from __future__ import annotations

import dataclasses
import math

import pcompile
from pcompile.cost.pricing import CostOptions, _exposed, layer_cost, sdp_units, stage_layout
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import Strategy


def test_without_a_wait_the_work_overlaps_at_eta():
    for eta in (0.0, 0.5, 1.0):
        for comm, compute in ((3.0, 1.0), (1.0, 3.0)):
            assert math.isclose(_exposed(comm, compute, eta), comm - eta * min(comm, compute))


def test_a_wait_hides_behind_compute_the_work_does_not_at_eta_zero():
    # 20 ms from issue, 5 ms of it the transfer's work: at eta 0 the work shows, the wait hides
    assert math.isclose(_exposed(20.0, 30.0, 0.0, work=5.0), 5.0)
    assert math.isclose(_exposed(20.0, 10.0, 0.0, work=5.0), 10.0)  # the wait outlasts compute
    assert math.isclose(_exposed(20.0, 30.0, 1.0, work=5.0), 0.0)


def _block(cluster, strategy):
    """(the block's LayerCost, its ZeRO-3 units)."""
    from pcompile.cost.layer_work import layer_work

    cfg = GPTConfig(hidden=64, num_heads=4, num_layers=2, seq_len=32)
    ir = pcompile.compile(GPT(cfg), cluster, gpt_inputs(cfg, 8), plan=pcompile.Plan.uniform(dp=4),
                          stop_after="layers")
    work = layer_work(ir, 1)["blocks.0"]
    options = CostOptions.runtime()
    cost = layer_cost(work, cluster, strategy, 8, 8, options, stage_layout(cluster, 0, strategy))
    return cost, sdp_units(work, strategy.split)


def test_zero3_backward_waits_its_regather_and_reduce_scatter_at_once():
    """Split 2: a block of 14 units (its norms, and its Linears 2 each), each re-gathered and
    reduce-scattered in backward; under a 50 ms wait per transfer the backward pays 14 waits, not 28."""
    wait = 0.05
    cluster = dataclasses.replace(pcompile.Cluster.local(4).with_min_transfer(wait), overlap=0.0)
    quiet = dataclasses.replace(pcompile.Cluster.local(4), overlap=0.0)
    s = Strategy(dp=4, sdp=True, split=2)
    (slow, units), (fast, _) = _block(cluster, s), _block(quiet, s)
    assert len(units) == 14 and all(again for _, again in units)
    extra = slow.bwd - fast.bwd
    assert (len(units) - 1) * wait < extra < (len(units) + 0.5) * wait, extra
