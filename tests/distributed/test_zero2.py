"""ZeRO-2 (zero2: parameters replicated, gradients and optimizer states sharded over dp) ==
serial on 4 gloo ranks: losses, global-norm-clipped gradients and the norm itself within 1e-5
over 3 AdamW steps of two train_steps each (gradient accumulation, the first under no_sync),
eval loss and parameters after them, on GPT (tied embedding / head) and an MLP; zero2 on every
layer at dp4 and dp2·tp2, beside dp and ZeRO-3 layers, and in a plan whose layers use different
(dp, tp) groupings. Each rank's AdamW state is 1/dp of the zero2 parameters (their tp slices);
a whole-tensor optimizer (Adafactor) is refused on the chunks.
Under bf16 (fp32 masters) zero2 matches the serial bf16 policy as closely as the other plans
do (test_mixed_precision.py's tolerances); a zero2 checkpoint loads under dp·tp in bf16 and a dp
one under zero2 bit for bit, and both then take the same step.
Pipelined: pp2·z2dp2 (1F1B, the tied embedding / head on two pp ranks) the same, in fp32 and bf16.
A model built on the meta device gets the same values from init_weights / load_weights under
zero2 as on one device, and trains from loaded weights as the serial model does."""
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import pcompile
from pcompile import Plan
from pcompile.models import GPT
from pcompile.plan import LayerAssignment, Strategy
from pcompile.runtime import zero2
from tests.distributed.ranks_weights import CFG, meta_gpt
from tests.distributed.ranks_zero2 import run_all
from tests.distributed.test_mixed_precision import FIRST_GRADS, LATER_GRADS, LOSS_VS_BF16, LOSS_VS_FP32, _relative

TOLERANCE = 1e-5
PARAM_TOLERANCE = 3 * 1e-2  # Adam on ~0 gradients, see test_equivalence.py

CASES = [
    ("gpt", Plan.uniform(dp=4, zero2=True), 16 * 2**10),  # small buckets: several in flight at once
    ("mlp", Plan.uniform(dp=4, zero2=True)),
    ("gpt", Plan.uniform(dp=2, tp=2, zero2=True)),
    ("mlp6", Plan(num_devices=4, default=Strategy(dp=4, zero2=True), layers=(  # beside dp and ZeRO-3 layers
        LayerAssignment("blocks.0", Strategy(dp=4)), LayerAssignment("blocks.1", Strategy(dp=4, sdp=True))))),
    ("gpt", Plan(num_devices=4, default=Strategy(dp=4, zero2=True), layers=(  # two (dp, tp) groupings
        LayerAssignment("blocks.1", Strategy(dp=2, tp=2, zero2=True)),))),
]
PP2 = dataclasses.replace(Plan.uniform(dp=2, pp=2, zero2=True), num_microbatches=2)
CASES.append(("gpt", PP2))
BF16 = [("gpt", Plan.uniform(dp=4, zero2=True)), ("gpt", Plan.uniform(dp=2, tp=2, zero2=True)), ("gpt", PP2)]
LOADS = [("gpt", (Plan.uniform(dp=4, zero2=True), None), (Plan.uniform(dp=2, tp=2), "bf16")),
         ("gpt", (Plan.uniform(dp=4), None), (Plan.uniform(dp=2, tp=2, zero2=True), None))]


SEED = 3


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    torch.manual_seed(7)
    serial = GPT(CFG)
    path = str(tmp_path_factory.mktemp("weights") / "model.safetensors")
    save_file({k: v.contiguous() for k, v in serial.state_dict().items() if k != "head.weight"}, path)  # tied
    meta = [(Plan.uniform(dp=4, zero2=True), SEED, path), (PP2, SEED, path)]
    out = pcompile.launch(run_all, 4, CASES, BF16, LOADS, str(tmp_path_factory.mktemp("zero2")), meta,
                          [(Plan.uniform(dp=4, zero2=True), path)])
    return out, serial.state_dict(), pcompile.init_weights(meta_gpt(), SEED).state_dict()


def test_zero2_meta_models_get_their_weights(per_rank):
    ranks, loaded, initialised = per_rank
    for rank in ranks:
        for r in rank["meta"]:
            assert all(torch.equal(r["init"][k], v) for k, v in initialised.items())
            assert all(torch.equal(r["loaded"][k], v) for k, v in loaded.items())
        for r in rank["from_file"]:
            assert r["loss_diff"] < TOLERANCE and r["grad_diff"] < TOLERANCE and r["param_diff"] < TOLERANCE, r


def test_zero2_bf16_and_checkpoints(per_rank):
    for rank in per_rank[0]:
        for r in rank["bf16"]:
            assert _relative(r["losses"], r["bf16_ref"]) < LOSS_VS_BF16, r
            assert _relative(r["losses"], r["fp32_ref"]) < LOSS_VS_FP32, r
            assert r["grad_diffs"][0] < FIRST_GRADS and max(r["grad_diffs"][1:]) < LATER_GRADS, r
            assert r["masters"] == r["optimizer"] == {torch.float32} and r["module"] == {torch.bfloat16}, r
        for r in rank["loads"]:
            assert r["step"] == 2 and r["param_diff"] == 0 and r["state_diff"] == 0, r
        bf16_load, fp32_load = rank["loads"]
        assert _relative(*([x] for x in bf16_load["next_losses"])) < LOSS_VS_FP32, bf16_load  # one bf16, one fp32
        assert fp32_load["next_losses"][0] == pytest.approx(fp32_load["next_losses"][1], rel=1e-5), fp32_load


def test_zero2_plans_match_serial(per_rank):
    for rank in per_rank[0]:
        results = rank["fp32"]
        assert len(results) == len(CASES)
        for r in results:
            assert r["loss_diff"] < TOLERANCE and r["grad_diff"] < TOLERANCE, r
            assert r["norm_diff"] < TOLERANCE and r["eval_diff"] < TOLERANCE, r
            assert r["param_diff"] < PARAM_TOLERANCE, r
            assert r["zero2_params"] > 0, r
            assert "Adafactor updates each parameter from the whole tensor" in r["adafactor"], r
            assert r["optimizer_numel"] == r["expected_numel"] < r["replicated_numel"], r
        uniform = results[0]  # GPT at dp4: every parameter but the odd-sized ones 1/4
        assert uniform["optimizer_numel"] < 0.3 * uniform["replicated_numel"], uniform
        assert uniform["buckets"] > 2 * zero2.IN_FLIGHT, uniform
