"""A global-batch range: the search plans every allowed batch and keeps the one with the most
samples per second, equal to planning each batch on its own and taking the best; batches that
fit no plan are reported, not chosen; the plan records its batch and compile() holds the user
to it; bad ranges are refused."""
import dataclasses

import pytest

import pcompile
from pcompile import Cluster, PcompileError
from pcompile.models import GPT, GPTConfig, gpt_inputs

CFG = GPTConfig(vocab_size=128, seq_len=32, hidden=64, num_heads=4, num_layers=2)
BATCHES = (4, 8, 16, 32)
NO_MICROBATCHES = {"microbatch_counts": (1,), "pp_degrees": (1,)}  # memory grows with the batch


def _alone(batch: int, cluster: Cluster, space: dict | None = None) -> float | None:
    """Samples per second of the plan searched for this batch alone (None: nothing fits)."""
    try:
        plan = pcompile.plan(GPT(CFG), cluster, gpt_inputs(CFG, batch), search_space=space)
    except PcompileError:
        return None
    assert plan.global_batch == batch
    return batch / plan.estimate.step_time


@pytest.mark.parametrize("memory, space", [(4 * 2**30, None), (int(1.3 * 2**20), NO_MICROBATCHES)])
def test_range_takes_the_batch_with_the_most_samples_per_second(memory, space):
    cluster = Cluster.local(4, memory_bytes=memory)
    plan = pcompile.plan(GPT(CFG), cluster, gpt_inputs(CFG, 8), search_space=space, global_batch=BATCHES)
    alone = {b: _alone(b, cluster, space) for b in BATCHES}
    fitting = {b: v for b, v in alone.items() if v is not None}
    assert plan.global_batch == max(fitting, key=fitting.get), (alone, plan.explanation)
    # the range's costs are the example batch's scaled by b / 8; a trace at b itself differs by
    # rounding-level amounts (measured 0.02 % of the step time)
    assert plan.global_batch / plan.estimate.step_time == pytest.approx(fitting[plan.global_batch], rel=1e-3)
    assert plan.estimate.peak_memory <= memory
    report = plan.explanation.split("global batch (the range allowed)")[1]
    assert f"{plan.global_batch}: " in report and "<- chosen" in report
    if space:  # under this budget the largest batch fits no plan: reported, not chosen
        assert alone[32] is None and "32: no plan" in report


def test_the_plan_holds_compile_to_its_batch():
    plan = pcompile.plan(GPT(CFG), Cluster.local(4), gpt_inputs(CFG, 8), global_batch=(8, 16))
    assert plan.global_batch == 16
    assert pcompile.Plan.from_json(plan.to_json()).global_batch == 16
    with pytest.raises(PcompileError, match="made for a global batch of 16, the example inputs hold 8"):
        pcompile.compile(GPT(CFG), Cluster.local(4), gpt_inputs(CFG, 8), plan=plan, stop_after="search")
    pcompile.compile(GPT(CFG), Cluster.local(4), gpt_inputs(CFG, 16), plan=plan, stop_after="search")
    anything = dataclasses.replace(plan, global_batch=None)  # hand-written plans: any batch
    pcompile.compile(GPT(CFG), Cluster.local(4), gpt_inputs(CFG, 8), plan=anything, stop_after="search")


@pytest.mark.parametrize("bad", [0, (8, -1), (), "16", (8.0,)])
def test_bad_ranges_are_refused(bad):
    with pytest.raises(PcompileError, match="must be a positive int or an iterable"):
        pcompile.plan(GPT(CFG), Cluster.local(4), gpt_inputs(CFG, 8), global_batch=bad)
