"""Mixed precision (compile(..., mixed_precision="bf16")): bf16 compute, fp32 master weights.

One 4-rank launch runs every plan (dp2·tp2, dp4, ZeRO-3 sdp4, pp2·dp2 1F1B, per-layer groupings
on the GPT with tied weights, dp2·tp2 on the MLP whose float inputs are cast) against two serial
references written out in ranks_mixed_precision.py: the same bf16 policy on one process, and
plain fp32.

Tolerances. bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ≈ 3.9e-3, one ulp = 2u
relative. The parallel program computes the same maths in another order (tp sums partial
matmuls across ranks, dp takes the mean of per-rank mean losses, every op rounds its output
to bf16), so it is a different bf16 rounding of the same function, not an approximation of
the serial bf16 program. Hence:
- loss vs serial bf16, rtol 2e-2: the loss is itself a bf16 number (the parallel one the fp32
  mean of dp bf16 losses), so 1-2 ulps (<= 4u ≈ 1.6e-2) apart are expected. Observed max 8.5e-3.
- first-step gradients, where both programs start from the same weights:
  * every tensor: max|parallel - serial bf16| <= 3 max|serial bf16 - fp32|. Two roundings of
    the same sums lie about as far from each other as each lies from the exact (fp32) value,
    <= 2x that by the triangle inequality if the parallel rounding error is of the same size;
    3 leaves margin. This floor also covers gradients that are pure rounding noise (the key
    bias: softmax is invariant to it, its exact gradient is 0), where a relative bound would
    be meaningless. Observed worst ratio 1.75 (blocks.1.attn.k.bias, per-layer groupings).
  * all gradients together: ||parallel - serial bf16|| / ||serial bf16|| <= 2e-2 (a few u).
    Observed max 6.6e-3 (dp2·tp2).
- gradients of steps 2 and 3, norm-wise 0.1: Adam's update lr m/sqrt(v) is about ±lr for any
  component whose gradient is within bf16 noise of 0, so one step leaves the two programs'
  weights up to 2 lr apart there and the next gradients are taken at slightly different
  points. Observed max 4.5e-2 (per-layer groupings, step 3).
- loss vs serial fp32, rtol 3e-2: bf16 forward rounding (a few u) plus the drift of two
  noisier updates. Observed max 3.0e-3.
Checkpoints hold the fp32 masters and AdamW states, so a bf16 save (dp2·tp2) loads under fp32
(dp4) and an fp32 save (dp4) under bf16 (pp2·dp2) bit for bit (max diff 0).
"""
import dataclasses

import pytest
import torch

import pcompile
from pcompile import Plan
from pcompile.errors import PcompileError
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import LayerAssignment, Strategy
from tests.distributed.ranks import MODELS
from tests.distributed.ranks_mixed_precision import LR, STEPS, run_all, serial_bf16

LOSS_VS_BF16, LOSS_VS_FP32 = 2e-2, 3e-2
FLOOR_FACTOR, FIRST_GRADS, LATER_GRADS = 3.0, 2e-2, 0.1
PP2 = dataclasses.replace(Plan.uniform(dp=2, pp=2), schedule="1F1B", num_microbatches=2)
# layers at different (dp, tp) groupings in one stage (the reshard pass): blocks.1 at dp1·tp4, the
# head at dp4 (the tied embedding/head weight is read at dp2 and dp4)
MIXED = Plan(num_devices=4, default=Strategy(dp=2, tp=2),
             layers=(LayerAssignment("blocks.1", Strategy(dp=1, tp=4)), LayerAssignment("post", Strategy(dp=4))))
CASES = [("gpt", Plan.uniform(dp=2, tp=2)), ("gpt", Plan.uniform(dp=4)), ("gpt", Plan.uniform(dp=4, sdp=True)),
         ("gpt", PP2), ("gpt", MIXED), ("mlp", Plan.uniform(dp=2, tp=2))]
LOADS = [("gpt", (Plan.uniform(dp=2, tp=2), "bf16"), (Plan.uniform(dp=4), None)),
         ("gpt", (Plan.uniform(dp=4), None), (PP2, "bf16"))]


def _relative(got: list[float], expected: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(got, expected))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    per_rank = pcompile.launch(run_all, 4, CASES, LOADS, str(tmp_path_factory.mktemp("mixed")))
    assert len(per_rank) == 4
    return per_rank


def test_bf16_plans_match_serial_bf16_and_fp32(results):
    for rank in results:
        assert [(r["model"], r["plan"]) for r in rank["bf16"]] == [(m, p.default.describe()) for m, p in CASES]
        for r in rank["bf16"]:
            assert _relative(r["losses"], r["bf16_ref"]) < LOSS_VS_BF16, r
            assert _relative(r["losses"], r["fp32_ref"]) < LOSS_VS_FP32, r
            for name, (diff, floor) in r["first_grads"].items():
                assert diff <= FLOOR_FACTOR * floor, (r["model"], r["plan"], name, diff, floor)
            assert r["grad_diffs"][0] < FIRST_GRADS, r
            assert max(r["grad_diffs"][1:]) < LATER_GRADS, r


def test_masters_fp32_module_bf16(results):
    for r in results[0]["bf16"]:
        assert r["module"] == {torch.bfloat16}, r  # forward and backward run on bf16 parameters
        assert r["masters"] == r["optimizer"] == r["full"] == r["loss_dtypes"] == {torch.float32}, r


def test_checkpoints_cross_load_between_bf16_and_fp32(results):
    for rank in results:
        for r in rank["loads"]:
            assert r["step"] == 2
            assert r["param_diff"] == 0.0 and r["state_diff"] == 0.0, r
            assert r["dtypes"] == {torch.float32}, r
            assert _relative(*([x] for x in r["next_losses"])) < LOSS_VS_FP32, r  # one bf16, one fp32


# -- without ranks ------------------------------------------------------------------------------
def _gpt():
    return GPT(GPTConfig()), gpt_inputs(GPTConfig(), 8)


def test_plan_costs_bf16_activations():
    """The same plan (the search pinned to one strategy) is predicted to need less memory under
    bf16: Adam's state is 16 bytes per parameter either way (4+4+8 fp32; 2+2 bf16 + 12 fp32
    master and moments), so the saving is the halved activations."""
    model, inputs = _gpt()
    space = {"pp_degrees": (1,), "sdp": (False,), "checkpoint": (False,), "splits": (1,)}
    fp32 = pcompile.plan(model, pcompile.Cluster.local(1), inputs, search_space=space)
    bf16 = pcompile.plan(model, pcompile.Cluster.local(1), inputs, search_space=space, mixed_precision="bf16")
    assert fp32.layers == bf16.layers and fp32.num_microbatches == bf16.num_microbatches
    assert bf16.estimate.peak_memory < fp32.estimate.peak_memory


def test_unknown_precision_is_refused():
    model, inputs = _gpt()
    with pytest.raises(PcompileError, match="unknown mixed_precision 'fp16'") as info:
        pcompile.compile(model, pcompile.Cluster.local(1), inputs, mixed_precision="fp16")
    assert "'bf16'" in info.value.fix


def test_one_process_bf16_is_the_serial_policy():
    """On one process the compiled graph runs the model's own ops in the same order, so the
    policy must reproduce the written-out serial bf16 reference exactly."""
    build, inputs = MODELS["mlp"]
    torch.manual_seed(0)
    model = build()
    ref_losses, ref_grads = serial_bf16(model, inputs)
    cm = pcompile.compile(model, pcompile.Cluster.local(1), inputs(0), plan=Plan.uniform(), mixed_precision="bf16")
    optimizer = torch.optim.AdamW(cm.parameters(), lr=LR)
    for step in range(STEPS):
        assert cm.train_step(*inputs(step)).item() == ref_losses[step]
        grads = cm.full_grads()
        assert all(torch.equal(grads[n], g) for n, g in ref_grads[step].items())
        optimizer.step()
        optimizer.zero_grad()
