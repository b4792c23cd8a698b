"""Refuse a loss that averaging cannot give, under a plan that averages parts of the batch.

Data parallelism averages the per-rank losses and gradients over dp (and a pipeline the
micro-batch losses and gradients over their number): exact for a mean over the batch, since
the mean of equal-sized chunk means is the whole batch's mean, and for a masked mean once
normalise_loss divides by the whole step's count. For a sum the result is the sum divided by
dp x micro-batches, and a nonlinear function of batch statistics (a product of batch means, a
division by a data value that is not a batch sum) is no average of its parts: wrong answers
with no error. So a plan with dp > 1 in any layer, or pp > 1 with several micro-batches, is
refused for those (pcompile.sharding.loss_terms says which terms are which). A function of
batch statistics (a mixture-of-experts router's load-balancing loss) is made exact under dp by
the batch_statistics pass and refused under micro-batching only.

Why refuse rather than scale a sum by dp x micro-batches: the per-layer dp groupings
(reshard) average gradients over different groups, and that rescaling is not verified exact.
"""
from __future__ import annotations

from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.sharding.loss_terms import STATS, SUM, averaging, inexact_terms, statistics_split


@register_pass("loss_check", kind="check", requires=("plan",), ensures=("loss_checked",))
def loss_check(ir: IR, ctx: PassContext) -> IR:
    """Refuse a summed or batch-coupled loss under a plan that averages it (dp > 1, micro-batches)."""
    why = averaging(ir, ctx.plan)
    terms = inexact_terms(ir, ctx.plan, ctx.example_inputs) if why else []
    if not terms:
        return ir
    term = terms[0]
    if term.kind == SUM:
        raise PcompileError(
            f"the loss is a sum over the batch ({term.how}, node {term.node.name}), but the plan {why}: "
            "exact only for a mean, the result would be the sum divided by the number of parts",
            "use reduction='mean' (or .mean()), or plan with dp=1 (and one micro-batch when pipelining), "
            "e.g. plan=pcompile.Plan.uniform(dp=1, tp=...)")
    if term.kind == STATS:
        raise PcompileError(
            f"the loss holds a function of batch statistics ({term.how}, node {term.node.name}), and "
            f"{statistics_split(ir, ctx.plan)}, so the statistics would be a part's, not the batch's",
            "plan with one micro-batch (num_microbatches=1) or without pipelining, and one dp degree for every "
            "layer; under uniform data parallelism pcompile reduces the statistics over the batch "
            "(the batch_statistics pass), e.g. plan=pcompile.Plan.uniform(dp=...)")
    raise PcompileError(
        f"the loss is not an average over the batch: {term.how} (node {term.node.name}), and the plan {why}, "
        "which no average of the parts' losses gives",
        "write the loss as a mean, a cross-entropy with ignore_index, or sum(loss * mask) / mask.sum() (the mask "
        "from the inputs), or plan with dp=1 and one micro-batch")
