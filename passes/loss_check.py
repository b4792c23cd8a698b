"""Refuse a loss that sums over the batch when the plan averages over ranks or micro-batches.

Data parallelism averages the per-rank losses and gradients over dp (and a pipeline the
micro-batch losses and gradients over their number): exact for a mean over the batch, since
the mean of equal-sized chunk means is the whole batch's mean. For a sum the result is the
sum divided by dp x micro-batches: a wrong answer with no error. So a plan with dp > 1 in any
layer, or pp > 1 with several micro-batches, is refused when the loss is a sum.

What counts as a sum: pcompile.sharding.loss_terms.summed_terms (a loss op with
reduction="sum", a full .sum() of a tensor computed from the inputs, through the loss's terms).

Why refuse rather than scale the loss by dp x micro-batches: the per-layer dp groupings
(reshard) average gradients over different groups, and that rescaling is not verified exact.
"""
from __future__ import annotations

from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.sharding.loss_terms import summed_terms


def averaging(ir: IR, plan) -> str | None:
    """What in the plan averages per-rank or per-micro-batch losses, or None."""
    dp = max(plan.strategy_for(layer).dp for layer in ir.layers)
    reasons = [f"dp={dp} averages the ranks' losses and gradients"] if dp > 1 else []
    if plan.pp > 1 and plan.num_microbatches > 1:
        reasons.append(f"pp={plan.pp} averages {plan.num_microbatches} micro-batches' losses and gradients")
    return " and ".join(reasons) or None


@register_pass("loss_check", kind="check", requires=("plan",), ensures=("loss_checked",))
def loss_check(ir: IR, ctx: PassContext) -> IR:
    """Refuse a loss that sums over the batch under a plan that averages it (dp > 1, micro-batches)."""
    why = averaging(ir, ctx.plan)
    terms = summed_terms(ir) if why else []
    if terms:
        node, how = terms[0]
        raise PcompileError(
            f"the loss is a sum over the batch ({how}, node {node.name}), but the plan {why}: "
            "exact only for a mean, the result would be the sum divided by the number of parts",
            "use reduction='mean' (or .mean()), or plan with dp=1 (and one micro-batch when pipelining), "
            "e.g. plan=pcompile.Plan.uniform(dp=1, tp=...)")
    return ir
