"""Hugging Face Llama and Qwen2 under compile(..., mixed_precision="bf16") (found with issue #15, item 5).

torch.export captures the model in fp32, so LlamaRMSNorm's `hidden_states.to(input_dtype)` and
RoPE's `cos.to(dtype=x.dtype)` were recorded as casts to fp32: under bf16 the first projection
raised ("expected m1 and m2 to have the same dtype"), and the residual stream (read through
RMSNorm's no-op upcast, which aliased it at capture) turned fp32. MasterWeights now rewrites such
casts to the run-time dtype and keeps the model's own upcasts (pcompile.runtime.precision,
follow_run_time_dtype; toy patterns in tests/runtime/test_capture_casts.py).

One 4-rank launch: both models (GQA, untied head) under dp4 and dp2·tp2, and Llama with every
layer checkpointed, ZeRO-3, sequence parallelism and a 2-stage 1F1B pipeline (Qwen2), each
against the serial model under the same bf16 recipe (module.to(bf16), fp32 masters; no
autocast) and plain fp32, with the tolerances of tests/distributed/test_mixed_precision.py
(derived there). Checkpointing, sp and the pipeline each failed before their part of the rule:
region and stage inputs without capture dtypes, sp's inserted nodes inside RoPE.
"""
import dataclasses

import pytest
import torch

import pcompile
from pcompile import Plan
from tests.distributed.test_mixed_precision import (
    FIRST_GRADS,
    FLOOR_FACTOR,
    LATER_GRADS,
    LOSS_VS_BF16,
    LOSS_VS_FP32,
    _relative,
)

pytest.importorskip("transformers")

CASES = [(name, plan) for name in ("llama", "qwen2") for plan in (Plan.uniform(dp=4), Plan.uniform(dp=2, tp=2))] + [
    # every layer a checkpoint region (nested GraphModules whose inputs are placeholders); `pre`
    # among them, whose get_attrs export puts before the graph's inputs
    ("llama", Plan.uniform(dp=2, tp=2, checkpoint=True)),
    ("llama", Plan.uniform(dp=4, sdp=True)),  # ZeRO-3
    ("llama", Plan.uniform(dp=2, tp=2, sp=True)),  # sp_split / sp_unsplit inside RoPE and the norms
    # stage graphs: the residual stream and RoPE's cos / sin received from the previous stage
    ("qwen2", dataclasses.replace(Plan.uniform(dp=2, pp=2), schedule="1F1B", num_microbatches=2)),
]


def _batch(seed: int):
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(seed))
    return ids, ids


def run_cases(cases) -> list[dict]:
    from tests.distributed.ranks_masked import hf_causal
    from tests.distributed.ranks_mixed_precision import run_bf16

    models = {name: (lambda name=name: hf_causal(name), _batch) for name in ("llama", "qwen2")}
    return [run_bf16(name, plan, models) for name, plan in cases]


@pytest.fixture(scope="module")
def results():
    return pcompile.launch(run_cases, 4, CASES, timeout=900)


def test_hf_models_train_in_bf16_as_the_serial_bf16_model(results):
    for rank in results:
        assert [(r["model"], r["plan"]) for r in rank] == [(m, p.default.describe()) for m, p in CASES]
        for r in rank:
            assert _relative(r["losses"], r["bf16_ref"]) < LOSS_VS_BF16, r
            assert _relative(r["losses"], r["fp32_ref"]) < LOSS_VS_FP32, r
            for name, (diff, floor) in r["first_grads"].items():
                assert diff <= FLOOR_FACTOR * floor, (r["model"], r["plan"], name, diff, floor)
            assert r["grad_diffs"][0] < FIRST_GRADS, r
            assert max(r["grad_diffs"][1:]) < LATER_GRADS, r


def test_parameters_bf16_masters_and_loss_fp32(results):
    for r in results[0]:
        assert r["module"] == {torch.bfloat16}, r
        assert r["masters"] == r["optimizer"] == r["full"] == r["loss_dtypes"] == {torch.float32}, r
