"""Plan: frozen, printable, JSON round-trip (also a searched plan with its candidates)."""
import dataclasses

import pytest

import pcompile
from pcompile import Cluster, LayerAssignment, PcompileError, Plan, Strategy
from pcompile.models import GPT, GPTConfig, gpt_inputs


@pytest.fixture(scope="module")
def searched() -> Plan:
    cfg = GPTConfig(num_layers=2)
    return pcompile.plan(GPT(cfg), Cluster.local(4), gpt_inputs(cfg, 8))


def test_uniform_plan():
    p = Plan.uniform(dp=2, tp=2)
    assert p.num_devices == 4 and p.default == Strategy(dp=2, tp=2)
    assert p.strategy_for("blocks.0") == p.default
    assert str(p).splitlines()[0] == "Plan for 4 device(s): dp2·tp2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.num_devices = 8


def test_strategy_describe_and_validation():
    assert Strategy(dp=4, tp=2, sdp=True, checkpoint=True).describe() == "sdp4·tp2·ckpt"
    with pytest.raises(PcompileError, match="strategy field tp=0 must be a positive integer"):
        Strategy(tp=0)


def test_plan_device_count_must_match():
    with pytest.raises(PcompileError, match="dp=2 x tp=2 x pp=1 = 4 devices but says num_devices=8"):
        Plan(num_devices=8, default=Strategy(dp=2, tp=2))


def test_json_round_trip_with_layers():
    p = Plan(num_devices=4, default=Strategy(dp=2, tp=2),
             layers=(LayerAssignment("blocks.0", Strategy(dp=4, tp=1, checkpoint=True)),), model="abc")
    back = Plan.from_json(p.to_json())
    assert back == p and back.strategy_for("blocks.0").checkpoint and back.model == "abc"
    assert back.to_json() == p.to_json()


def test_searched_plan_round_trips_with_candidates(searched):
    assert searched.num_devices == 4
    assert searched.model == pcompile.fingerprint(GPT(GPTConfig(num_layers=2)))
    assert searched.estimate is not None and searched.estimate.step_time > 0
    # The candidates are the baselines, costed by the same model: every family is named.
    names = [c.verdict.split(":")[0] for c in searched.candidates]
    assert names == ["baseline dp", "baseline zero3", "baseline megatron", "baseline uniform_3d",
                     "baseline pipeline_even"]
    assert all(c.estimate.step_time >= searched.estimate.step_time * (1 - 1e-9)
               for c in searched.candidates if c.estimate is not None), "never worse than a baseline"
    assert {a.layer for a in searched.layers} == {"pre", "blocks.0", "blocks.1", "post"}
    back = Plan.from_json(searched.to_json())
    assert back == searched
    # candidates, reason and explanation are compare=False: check them explicitly
    assert back.candidates == searched.candidates and back.reason == searched.reason
    assert back.explain() == searched.explain() and "baselines (same cost tables)" in back.explain()
    assert str(back) == str(searched)


def test_searched_plan_prints_the_choice_and_the_losers(searched):
    text = str(searched)
    assert "why: plan:" in text and "candidates:" in text
    assert "baseline dp:" in text and "predicted step" in text


def test_malformed_plan_json():
    with pytest.raises(PcompileError, match="plan is not valid JSON"):
        Plan.from_json("{nope")
    with pytest.raises(PcompileError, match="malformed plan"):
        Plan.from_json('{"default": {"dp": 1}}')
    with pytest.raises(PcompileError, match="not an object"):
        Plan.from_json("[1]")


def _interleaved(v: int, stages: tuple[int, ...] = ()) -> Plan:
    layers = tuple(LayerAssignment(f"blocks.{i}", Strategy(dp=2), s) for i, s in enumerate(stages))
    return Plan(num_devices=4, default=Strategy(dp=2), pp=2, num_microbatches=4, schedule="Interleaved1F1B",
                virtual_stages=v, layers=layers)


def test_virtual_stages_validation():
    assert _interleaved(2, (0, 1, 2, 3)).virtual_stages == 2  # stages 0..pp*v-1, stage s on pp rank s mod pp
    assert _interleaved(3, (0, 1, 2, 3, 4, 5)).virtual_stages == 3
    assert Plan.uniform(dp=2, pp=2).virtual_stages == 1
    with pytest.raises(PcompileError, match="Interleaved1F1B needs virtual_stages >= 2"):
        _interleaved(1)
    with pytest.raises(PcompileError, match="virtual_stages=2 needs schedule Interleaved1F1B"):
        dataclasses.replace(Plan.uniform(dp=2, pp=2), virtual_stages=2)
    with pytest.raises(PcompileError, match="plan field virtual_stages=0 must be a positive integer"):
        dataclasses.replace(Plan.uniform(dp=2, pp=2), virtual_stages=0)
    with pytest.raises(PcompileError, match=r"stage 4 but the plan has pp=2 x virtual_stages=2 = 4 stages"):
        _interleaved(2, (0, 1, 2, 4))
    with pytest.raises(PcompileError, match="stage 2 but the plan has pp=2 x virtual_stages=1 = 2 stages"):
        Plan(num_devices=4, default=Strategy(dp=2), pp=2, layers=(LayerAssignment("blocks.0", Strategy(dp=2), 2),))


def test_virtual_stages_json_round_trip_and_text():
    p = _interleaved(3, (0, 1, 2, 3, 4, 5))
    back = Plan.from_json(p.to_json())
    assert back == p and back.virtual_stages == 3 and '"virtual_stages": 3' in p.to_json()
    assert str(p).splitlines()[0] == ("Plan for 4 device(s): dp2·tp1 x pp2 (Interleaved1F1B, 3 virtual stages "
                                      "per rank, 4 micro-batches)")
    assert p.explain() == str(p)  # an unsearched plan explains itself by its text
    old = p.to_dict()  # written before the field existed: interleaved plans ran 2 chunks per rank
    del old["virtual_stages"]
    old["layers"] = []
    assert Plan.from_dict(old).virtual_stages == 2
    assert Plan.from_dict({k: v for k, v in Plan.uniform(dp=2, pp=2).to_dict().items()
                           if k != "virtual_stages"}).virtual_stages == 1


def test_an_offloaded_optimizer_needs_zero3_on_one_stage_and_round_trips():
    plan = Plan.uniform(dp=4, sdp=True, offload_optimizer=True)
    assert Plan.from_json(plan.to_json()) == plan and "offloaded to the host" in str(plan)
    assert Plan.from_json(Plan.uniform(dp=4).to_json()).offload_optimizer is False
    with pytest.raises(PcompileError, match="needs every data-parallel layer sharded with ZeRO-3"):
        Plan.uniform(dp=4, offload_optimizer=True)
    with pytest.raises(PcompileError, match="one-stage plans only"):
        Plan.uniform(dp=2, pp=2, sdp=True, offload_optimizer=True)
    Plan.uniform(tp=4, offload_optimizer=True)  # dp = 1: nothing to shard


def test_offloading_narrows_the_search_to_what_it_runs_with():
    from pcompile.options import CompileOptions

    limits = CompileOptions.make(offload_optimizer=True, search_space={"checkpoint": (True,)}).space_limits
    assert limits == {"checkpoint": (True,), "sdp": (True,), "zero2": (False,), "pp_degrees": (1,)}
    with pytest.raises(PcompileError, match="leaves nothing an offloaded optimizer runs with"):
        CompileOptions.make(offload_optimizer=True, search_space={"sdp": (False,)})
