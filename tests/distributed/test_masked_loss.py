"""Fine-tuning losses (a mean over the tokens that count) equal the serial model under every
plan that averages: the built-in GPT with ignore_index labels, a loss-mask model
(sum(loss * mask) / mask.sum()) and Hugging Face Qwen2 / Llama ForCausalLM with -100 labels, on
batches masked unequally per sample with one micro-batch (and one dp4 shard) holding no valid
label at all: loss and gradients within 1e-5 after each of 3 AdamW steps under dp4, dp2·tp2,
ZeRO-3 and a pipeline of 2 stages x 2 micro-batches. One 4-rank launch."""
import operator

import pytest

import pcompile
from pcompile import PcompileError, Plan
from pcompile.ir.graph import IR
from pcompile.runtime.loss_counts import step_count
from tests.distributed.ranks_masked import MODELS, compare_many, pipelined

PLANS = {"dp4": Plan.uniform(dp=4), "dp2·tp2": Plan.uniform(dp=2, tp=2), "zero3": Plan.uniform(dp=4, sdp=True),
         "pp2·dp2·m2": pipelined(2, 2, 2)}
CASES = ([(model, PLANS[plan]) for model in ("gpt", "mask", "qwen2") for plan in PLANS]
         + [("llama", PLANS["dp2·tp2"]), ("llama", PLANS["pp2·dp2·m2"])])


def test_masked_means_match_serial_under_every_plan():
    per_rank = pcompile.launch(compare_many, 4, CASES, timeout=900)
    for results in per_rank:
        for (name, _), r in zip(CASES, results):
            assert r["normalised"], r
            assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_rewrite_divides_by_the_step_count(name):
    build, batch = MODELS[name]
    ir = pcompile.compile(build(), pcompile.Cluster.local(4), batch(0), plan=PLANS["pp2·dp2·m2"],
                          stop_after="normalise_loss")
    assert isinstance(ir, IR) and ir.loss_counts is not None
    assert ir.loss_counts.placeholders == ("pcompile_loss_count0",)
    (count,) = ir.loss_counts.gm(*batch(0))
    labels = batch(0)[1]
    expected = (labels != -100).sum() if name != "mask" else batch(0)[2].sum()
    if name in ("qwen2", "llama"):  # HF shifts the labels: the last position of each sample has none
        expected = (labels[:, 1:] != -100).sum()
    assert count.item() == expected.item()
    # 2 dp parts x 2 micro-batches are averaged: each part's sum is scaled by 4 / the step's count
    assert "* 4.0" in ir.gm.code
    # the count is read (its all-reduce waited) only where the loss divides by it: after every
    # matmul of the forward, so the all-reduce runs while the forward computes
    nodes = list(ir.graph.nodes)
    (read,) = [n for n in nodes if n.target is step_count]
    assert [u.target for u in read.users] == [operator.truediv]
    matmuls = [i for i, n in enumerate(nodes) if "linear" in str(n.target) or "matmul" in str(n.target)
               or n.op == "call_module" and "head" in str(n.target)]
    assert matmuls and nodes.index(read) > max(matmuls)


def test_plans_that_average_nothing_keep_the_loss():
    build, batch = MODELS["gpt"]
    ir = pcompile.compile(build(), pcompile.Cluster.local(2), batch(0), plan=Plan.uniform(tp=2),
                          stop_after="normalise_loss")
    assert ir.loss_counts is None


def test_a_denominator_that_is_not_a_batch_count_is_refused():
    import torch
    import torch.nn.functional as F

    class RatioOfMeans(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x, y):
            return F.mse_loss(self.fc(x), y, reduction="sum") / y.abs().mean()

    x, y = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(PcompileError, match=r"not an average over the batch: a division by .*not a sum over the "
                                            r"batch.*dp=2 averages") as info:
        pcompile.compile(RatioOfMeans(), pcompile.Cluster.local(2), (x, y), plan=Plan.uniform(dp=2),
                         stop_after="loss_check")
    assert "mask.sum()" in info.value.fix
