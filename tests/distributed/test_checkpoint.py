"""Checkpoints survive a change of plan: saved under dp2·tp2 on 4 ranks, loaded under other
plans and world sizes and into the serial model; parameters and Adam states equal exactly;
training continues with the losses of an uninterrupted run."""
import dataclasses
import os

import pytest
import torch

import pcompile
from pcompile import LayerAssignment, Plan, Strategy, checkpoint
from pcompile.models import GPT
from tests.distributed import ranks_checkpoint as rc

SAVED_STEPS = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt"))
    result = pcompile.launch(rc.save_after, 4, Plan.uniform(dp=2, tp=2), directory, SAVED_STEPS)[0]
    uninterrupted = pcompile.launch(rc.save_after, 4, Plan.uniform(dp=2, tp=2),
                                    str(tmp_path_factory.mktemp("ref")), SAVED_STEPS + 2)[0]
    return directory, result, uninterrupted


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_layout_is_atomic(saved):
    directory, _, _ = saved
    with open(os.path.join(directory, "latest")) as f:
        assert f.read() == f"step-{SAVED_STEPS:08d}"
    assert not [name for name in os.listdir(directory) if name.endswith(".tmp")]


@pytest.mark.parametrize("world,plan", [(4, Plan.uniform(dp=1, tp=4)), (2, Plan.uniform(dp=2, tp=1))])
def test_load_under_another_plan(saved, world, plan):
    directory, result, uninterrupted = saved
    loaded = pcompile.launch(rc.load_and_continue, world, plan, directory, range(SAVED_STEPS, SAVED_STEPS + 2))
    for rank_result in loaded:
        assert rank_result["step"] == SAVED_STEPS
        _equal(rank_result["state"], result["state"])
        _equal(rank_result["optim"], result["optim"])
        # Continued training follows the uninterrupted run (other tp degree: fp32 reassociation only).
        for got, expected in zip(rank_result["losses"], uninterrupted["losses"][SAVED_STEPS:]):
            assert abs(got - expected) < 1e-5


def test_load_under_pipelining_on_two_ranks(saved):
    """Saved under dp2·tp2 on 4 ranks, loaded under pp=2 on 2 ranks (each holds one stage)."""
    directory, result, uninterrupted = saved
    plan = Plan(num_devices=2, default=Strategy(), pp=2, num_microbatches=2)
    loaded = pcompile.launch(rc.load_and_continue, 2, plan, directory, range(SAVED_STEPS, SAVED_STEPS + 2))
    optim = {}
    for rank_result in loaded:
        assert rank_result["step"] == SAVED_STEPS
        _equal(rank_result["state"], result["state"])  # full_state_dict gathers across stages
        optim.update(rank_result["optim"])  # each stage's Adam states
        for got, expected in zip(rank_result["losses"], uninterrupted["losses"][SAVED_STEPS:]):
            assert abs(got - expected) < 1e-5
    _equal(optim, result["optim"])


SHARDED = [  # ZeRO-3 inside pipeline stages (one layer also recomputed), and sdp x tp: a 2-D (tp, dp) cut
    dataclasses.replace(Plan.uniform(dp=2, pp=2, sdp=True), num_microbatches=2,
                        layers=(LayerAssignment("blocks.0", Strategy(dp=2, sdp=True, checkpoint=True)),)),
    Plan.uniform(dp=2, tp=2, sdp=True),
]


def test_sharded_plans_load_train_and_save(saved, tmp_path):
    """Saved under dp2·tp2, loaded under pp2·sdp2 and sdp2·tp2 (4 ranks): parameters and Adam
    states equal exactly, training continues with the uninterrupted losses, and what these
    plans then save loads back (into the serial model) equal to what they held."""
    directory, result, uninterrupted = saved
    steps = range(SAVED_STEPS, SAVED_STEPS + 2)
    per_rank = pcompile.launch(rc.load_continue_save, 4, SHARDED, directory, steps, str(tmp_path))
    for index, plan in enumerate(SHARDED):
        optim, optim_after = {}, {}
        for rank_results in per_rank:
            r = rank_results[index]
            assert r["step"] == SAVED_STEPS
            _equal(r["state"], result["state"])
            optim.update(r["optim"])  # under pipelining each rank has its stages' states
            optim_after.update(r["optim_after"])
            for got, expected in zip(r["losses"], uninterrupted["losses"][SAVED_STEPS:]):
                assert abs(got - expected) < 1e-5, (plan, got, expected)
        _equal(optim, result["optim"])
        full = checkpoint.load_full(str(tmp_path / str(index)), with_optimizer=True)
        _equal({k: v for k, v in full.items() if not k.startswith("optim.")}, per_rank[0][index]["after"])
        _equal({k: v for k, v in full.items() if k.startswith("optim.")}, optim_after)


def test_load_full_into_serial_model(saved):
    directory, result, _ = saved
    state = checkpoint.load_full(directory)
    _equal(state, result["state"])
    model = GPT(rc.CONFIG)
    model.load_state_dict(state, strict=True)
    assert model.head.weight.data_ptr() == model.tok_emb.weight.data_ptr()  # still tied after loading
    optim = {k: v for k, v in checkpoint.load_full(directory, with_optimizer=True).items() if k.startswith("optim.")}
    _equal(optim, result["optim"])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(pcompile.PcompileError, match="no complete checkpoint"):
        checkpoint.load_full(str(tmp_path))


def test_directories_not_shared_by_every_rank_are_refused(tmp_path):
    per_rank = pcompile.launch(rc.node_local_directories, 2, str(tmp_path))
    for result in per_rank:
        cause, fix = result["save"]
        assert "not shared by every rank" in cause and "rank(s) 1 on" in cause and "NFS" in fix
        cause, fix = result["load"]
        assert "missing on rank(s) 1 on" in cause and "NFS" in fix


def test_expert_parallel_checkpoints_load_under_other_ep_degrees(tmp_path):
    """The built-in MoE GPT saved under dp4·ep4 (each rank holds one expert of each block, and
    writes only it) loads under dp4·ep2, dp4 (no ep) and back into ep4: parameters and Adam states
    equal exactly, training continues with the uninterrupted losses; load_full reads every expert."""
    loads = [Plan.uniform(dp=4, ep=2), Plan.uniform(dp=4), Plan.uniform(dp=4, ep=4)]
    per_rank = pcompile.launch(rc.experts_save_and_load, 4, Plan.uniform(dp=4, ep=4), loads, str(tmp_path))
    saved = per_rank[0]["saved"]
    for rank_result in per_rank:
        for plan, r in zip(loads, rank_result["loaded"]):
            assert r["step"] == 2
            _equal(r["state"], saved["state"])
            _equal(r["optim"], saved["optim"])
            for got, expected in zip(r["losses"], saved["losses"]):
                assert abs(got - expected) < 1e-5, (plan.default.describe(), got, expected)
    _equal(checkpoint.load_full(str(tmp_path)), saved["state"])
