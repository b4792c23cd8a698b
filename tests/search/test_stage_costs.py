"""StageCosts' tables equal pcompile.cost.pricing.cost_table's entry by entry (it only shares work),
and the search pass narrows tp as asked."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pcompile
from pcompile.cluster import NodeGroup
from pcompile.cost.pricing import CostOptions, cost_table
from pcompile.cost.stage_costs import StageCosts
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.search.space import SearchRules, SearchSpace, strategies_for
from tests.cost.conftest import analyse

FIELDS = ("fwd_time", "bwd_time", "sync_time", "state_memory", "activation_memory", "temp_memory",
          "switch_time", "boundary_bytes")


def two_nodes_of_four() -> pcompile.Cluster:
    a100 = pcompile.Cluster.preset("8xA100-80GB")
    return dataclasses.replace(a100, node_groups=(NodeGroup(a100.node_groups[0].device, 2, 4),), name="2x4")


@pytest.fixture(scope="module")
def gpt4():
    cfg = GPTConfig(num_layers=4)
    return analyse(GPT(cfg), gpt_inputs(cfg, 8))


@pytest.mark.parametrize("cluster", ["2x4", "4xA100-80GB+4xV100-32GB"])
def test_tables_equal_cost_table(gpt4, cluster):
    ir, _ = gpt4
    cluster = two_nodes_of_four() if cluster == "2x4" else pcompile.Cluster.preset(cluster)
    for mixed in (False, True):
        costs = StageCosts(ir, cluster, CostOptions(mixed_precision=mixed))
        for devices, microbatch in ((8, 8), (4, 4), (2, 2), (4, 1)):
            strategies = strategies_for(devices, 4, microbatch, SearchSpace(), SearchRules())
            for first in range(0, 8, devices):
                got = costs.table(first, devices, microbatch, strategies)
                want = cost_table(ir, cluster, devices, microbatch, strategies,
                                  CostOptions(first_rank=first, mixed_precision=mixed))
                for name in FIELDS:
                    assert np.array_equal(getattr(got, name), getattr(want, name)), (name, devices, first)


def test_equivalent_stages_share_one_table(gpt4):
    ir, _ = gpt4
    costs = StageCosts(ir, two_nodes_of_four(), CostOptions())
    strategies = strategies_for(2, 4, 4, SearchSpace(), SearchRules())
    tables = {id(costs.table(first, 2, 4, strategies)) for first in range(0, 8, 2)}
    assert len(tables) == 1  # every pair of ranks sits inside one node of equal devices


def test_plan_narrowed_to_several_tp_degrees():
    cfg = GPTConfig()
    plan = pcompile.plan(GPT(cfg), pcompile.Cluster.local(4), gpt_inputs(cfg, 8),
                         search_space={"tp_degrees": (1, 2)})
    assert plan.default.tp in (1, 2) and all(a.strategy.tp in (1, 2) for a in plan.layers)
