"""Rewrite: a loss term that is a function of batch statistics gets the whole batch's statistics.

A mixture-of-experts router's load-balancing loss is num_experts * sum(f * P), f the share of
tokens routed to each expert and P the mean router probability - each a mean over the
batch's tokens. A data-parallel rank computing it on its part multiplies its part's means:
the average of those products over the ranks is not the product of the whole batch's means
(the serial loss), and the gradients differ by as much (~1% in a tiny Mixtral under dp4).
pcompile.sharding.loss_terms finds such terms ("statistics": every path from the data into
the term passes through a mean or sum over the batch dim, the batch dims found by
pcompile.sharding.batch_dims); this pass puts a `batch_statistic` after each of those
reductions, which all-reduces the part statistics over the layer's dp group into the whole
batch's (mean of equal parts' means, sum of sums). Every rank then computes the same term,
the serial one; the runtime's averaging over dp leaves it unchanged, and the op's backward
(identity for a mean, x dp for a sum) makes the dp-averaged gradients the serial ones.

Micro-batching cannot be made exact this way (a stage only ever sees one micro-batch):
loss_check refuses those plans. Plans that average nothing are left as they are.

Ordering: after loss_check and normalise_loss, before tensor_parallel (the batch dims are
found on the unsharded graph) and reshard (which renames the dp axis of layers at another dp).
"""
from __future__ import annotations

import torch.fx as fx

from pcompile.ir import IR
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.runtime.collectives import batch_statistic
from pcompile.sharding.loss_terms import STATS, averaging, classified

AXIS = "dp"


@register_pass("batch_statistics", kind="rewrite", requires=("plan", "loss_checked", "loss_normalised"),
               ensures=("batch_statistics",))
def batch_statistics(ir: IR, ctx: PassContext) -> IR:
    """Loss terms made of batch statistics read the whole batch's (see the module docstring)."""
    if averaging(ir, ctx.plan) is None:
        return ir
    made: dict[fx.Node, fx.Node] = {}
    for term in (t for t in classified(ir, ctx.example_inputs) if t.kind == STATS):
        for stat, kind in term.stats:
            if stat in made:
                continue
            layer = ir.meta(stat).layer
            dp = ctx.plan.strategy_for(layer).dp if layer is not None else ctx.plan.default.dp
            if dp == 1:
                continue
            with ir.graph.inserting_after(stat):
                whole = ir.graph.call_function(batch_statistic, (stat, kind, AXIS, dp))
            stat.replace_all_uses_with(whole, delete_user_cb=lambda user: user is not whole)
            meta = ir.meta(whole)
            meta.shape, meta.dtype, meta.layer = ir.meta(stat).shape, ir.meta(stat).dtype, layer
            meta.placement = ir.meta(stat).placement
            made[stat] = whole
    if made:
        ir.graph.lint()
        ir.gm.recompile()
        ctx.report.append(f"batch_statistics: {len(made)} batch statistic(s) of the loss reduced over dp "
                          f"({', '.join(n.name for n in made)})")
    return ir
