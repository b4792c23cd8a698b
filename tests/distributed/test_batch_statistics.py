"""A loss with a function of the whole batch's statistics (a mixture-of-experts router's
load-balancing loss: a product of batch means) equals the serial model under data parallelism:
the batch_statistics rewrite all-reduces each statistic over dp. A Switch-style top-1 MoE and
Hugging Face Mixtral (output_router_logits=True), loss and gradients within 1e-5 over 3 AdamW
steps under dp4, ZeRO-3, dp2·tp2 and a 2-stage pipeline of one micro-batch; without the rewrite
(the parts' statistics) the same run differs. One 4-rank launch."""
import dataclasses

import pcompile
from pcompile import Plan
from tests.distributed.ranks_statistics import compare_many

ONE_MICROBATCH = dataclasses.replace(Plan.uniform(dp=2, pp=2), num_microbatches=1, schedule="GPipe")
CASES = [("switch", Plan.uniform(dp=4), True), ("switch", Plan.uniform(dp=4, sdp=True), True),
         ("switch", Plan.uniform(dp=2, tp=2), True), ("mixtral", Plan.uniform(dp=4), True),
         ("mixtral", Plan.uniform(dp=2, tp=2), True), ("mixtral", ONE_MICROBATCH, True),
         ("switch", Plan.uniform(dp=4), False), ("mixtral", Plan.uniform(dp=4), False)]


def test_batch_statistics_match_serial_and_are_needed():
    results = pcompile.launch(compare_many, 4, CASES, timeout=900)[0]
    for (name, plan, reduce), r in zip(CASES, results):
        if reduce:
            assert r["statistics"] > 0 and r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, (name, plan, r)
        else:  # the parts' statistics: a different loss and different gradients
            assert r["statistics"] == 0 and r["grad_diff"] > 1e-4, (name, plan, r)
