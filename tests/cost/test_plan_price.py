"""One price for a plan: pcompile.estimate prices any plan through the search's own cost tables
and stage evaluation, so a searched plan's estimate comes back exactly (pipelined, interleaved
and per-layer tp mixing included), a forced plan is priced the same way as compile() reports
it, and a forced pipeline is cut where its plan says."""
import dataclasses

import pytest

import pcompile
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.plan import LayerAssignment, Plan, Strategy

GPT4 = GPTConfig(num_layers=4)
CASES = {  # (model, inputs, memory budget, search space): what the search must choose there
    "pipelined": (lambda: GPT(GPT4), gpt_inputs(GPT4, 8), 4 * 2**30, {"pp_degrees": (2,), "schedules": ("1F1B",)}),
    "interleaved": (lambda: GPT(GPT4), gpt_inputs(GPT4, 8), 4 * 2**30,
                    {"pp_degrees": (2,), "schedules": ("Interleaved1F1B",)}),
    "mixed-tp": (lambda: MLPModel(MLPConfig()), mlp_inputs(MLPConfig(), 16), 2**20,
                 {"pp_degrees": (1,), "sdp": (False,), "zero2": (False,)}),  # no ZeRO: tp must save memory
    "tight": (lambda: GPT(GPTConfig()), gpt_inputs(GPTConfig(), 8), int(0.8 * 2**20), None),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def searched(request):
    build, inputs, budget, space = CASES[request.param]
    cluster = pcompile.Cluster.local(4, memory_bytes=budget)
    return request.param, build, inputs, cluster, pcompile.plan(build(), cluster, inputs, search_space=space)


def test_a_searched_plan_is_priced_exactly_as_the_search_priced_it(searched):
    name, build, inputs, cluster, plan = searched
    if name == "pipelined":
        assert plan.pp == 2 and plan.schedule == "1F1B"
    if name == "interleaved":
        assert plan.virtual_stages == 2
    if name == "mixed-tp":
        assert len({a.strategy.tp for a in plan.layers}) > 1, str(plan)
    if name == "tight":
        assert any(a.strategy.checkpoint or a.strategy.sdp for a in plan.layers), str(plan)
    estimate = pcompile.estimate(build(), cluster, inputs, plan)
    assert estimate.step_time == plan.estimate.step_time and estimate.peak_memory == plan.estimate.peak_memory
    assert estimate == plan.estimate


def test_compiling_the_searched_plan_reports_its_estimate_and_cuts_its_stages(searched):
    _, build, inputs, cluster, plan = searched
    compiled = pcompile.compile(build(), cluster, inputs, plan=Plan.from_json(plan.to_json()))  # not lowered: no ranks
    assert compiled.plan.estimate == plan.estimate
    if plan.pp > 1:
        stages = {layer: s.index for s in compiled.ir.pipeline.stages for layer in s.layers}
        assert stages == {a.layer: a.stage for a in plan.layers}


def test_a_forced_pipeline_is_cut_where_the_plan_says_and_priced_that_way():
    cluster = pcompile.Cluster.local(2)
    inputs = gpt_inputs(GPT4, 8)
    uniform = dataclasses.replace(Plan.uniform(pp=2), num_microbatches=2)
    layers = ("pre", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "post")
    for cut in ((0, 0, 1, 1, 1, 1), (0, 0, 0, 0, 1, 1)):
        plan = dataclasses.replace(uniform, layers=tuple(LayerAssignment(layer, Strategy(), stage)
                                                          for layer, stage in zip(layers, cut)))
        ir = pcompile.compile(GPT(GPT4), cluster, inputs, plan=plan, stop_after="pipeline_split")
        assert [list(s.layers) for s in ir.pipeline.stages] == [[l for l, s in zip(layers, cut) if s == k]
                                                                 for k in range(2)]
    prices = {cut: pcompile.estimate(GPT(GPT4), cluster, inputs, dataclasses.replace(uniform, layers=tuple(
        LayerAssignment(layer, Strategy(), stage) for layer, stage in zip(layers, cut))))
        for cut in ((0, 0, 1, 1, 1, 1), (0, 0, 0, 0, 1, 1))}
    # an uneven cut (1 block | 3 blocks) is slower than the even one (2 | 2), and priced so
    assert prices[(0, 0, 0, 0, 1, 1)].step_time < prices[(0, 0, 1, 1, 1, 1)].step_time


def test_a_forced_pipeline_without_stages_is_cut_by_the_cost_model():
    cluster = pcompile.Cluster.local(2)
    plan = dataclasses.replace(Plan.uniform(pp=2), num_microbatches=2)
    compiled = pcompile.compile(GPT(GPT4), cluster, gpt_inputs(GPT4, 8), plan=plan)  # not lowered: no ranks
    assert [list(s.layers) for s in compiled.ir.pipeline.stages] == [["pre", "blocks.0", "blocks.1"],
                                                                    ["blocks.2", "blocks.3", "post"]]
    assert [a.stage for a in compiled.plan.layers] == [0, 0, 0, 1, 1, 1]
    assert compiled.plan.estimate == pcompile.estimate(GPT(GPT4), cluster, gpt_inputs(GPT4, 8), plan)
