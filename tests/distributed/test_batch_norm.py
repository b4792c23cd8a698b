"""BatchNorm over a batch split across ranks (pcompile.runtime.batch_norm), on 4 gloo ranks in
one launch: loss, gradients, running statistics (and the eval-mode loss that reads them) equal
the serial model's after 3 AdamW steps under dp4, ZeRO-3, checkpointing (the recomputation
does not count the batch twice), F.batch_norm calls, an export capture, momentum=None (planned
with a constant momentum: the fake analysis cannot read num_batches_tracked), and a pipeline with one
micro-batch (its metadata inference leaves the running statistics alone: before, NaN); a
pipeline with several micro-batches is refused naming the layer and the fixes."""
import pcompile
from pcompile import Plan
from pcompile.plan import Strategy
from tests.distributed.ranks_batch_norm import pipeline, run_all

CHECKPOINTED = Plan(num_devices=4, default=Strategy(dp=4, checkpoint=True))
CASES = [(Plan.uniform(dp=4),), (Plan.uniform(dp=4, sdp=True),), (CHECKPOINTED,),
         (Plan.uniform(dp=4), True), (Plan.uniform(dp=4), False, 0.1, "export"),
         (Plan.uniform(dp=4), False, None),  # momentum=None: the cumulative average over num_batches_tracked
         (pipeline(2, 2, 1),)]
REFUSALS = [pipeline(2, 2, 2)]
TOLERANCE = 1e-5


def test_batch_norm_equals_serial_under_split_batches():
    per_rank = pcompile.launch(run_all, 4, CASES, REFUSALS, timeout=900)
    for rank in per_rank:
        for case, result in zip(CASES, rank["cases"]):
            assert result["finite"], (case, result)
            for key in ("loss", "grad", "stats", "eval"):
                assert result[key] < TOLERANCE, (case, key, result)
        (message,) = rank["refusals"]
        assert "micro-batch" in message and "bn" in message and "num_microbatches=1" in message, message


def test_the_search_keeps_one_micro_batch_for_batch_norm_in_train_mode():
    from tests.distributed.ranks_batch_norm import BNNet, batch

    narrowed = {"pp_degrees": (2,)}  # a pipeline: several micro-batches would be refused at run time
    plan = pcompile.plan(BNNet(), pcompile.Cluster.local(4), batch(0), search_space=narrowed)
    assert plan.pp == 2 and plan.num_microbatches == 1, str(plan)
    assert "batch norm in train mode" in plan.explanation
    frozen = BNNet().eval()  # running statistics only: micro-batches are fine
    plan = pcompile.plan(frozen, pcompile.Cluster.local(4), batch(0), search_space=narrowed)
    assert plan.num_microbatches > 1 and "batch norm" not in plan.explanation, str(plan)
