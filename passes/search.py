"""Search (first version): one (dp, tp) strategy for the whole model.

Candidates are every factorisation dp * tp = number of devices whose tp splits every block
(tp_rules finds column/row Linear pairs; tp must divide heads and hidden sizes) and whose dp
divides the global batch. Each is costed by `pcompile.cost.estimate_uniform`; the fastest
that fits every device's memory wins. The plan keeps all candidates with the reason each
lost, so `print(plan)` explains the choice.
"""
from __future__ import annotations

import dataclasses


from pcompile.cost import SplitInfo, estimate_uniform
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.passmanager import PassContext, register_pass
from pcompile.passes.tp_rules import linear_parts, plan_tensor_parallel
from pcompile.plan import Candidate, Plan, Strategy


def split_info(ir: IR, tp: int) -> tuple[SplitInfo, dict[str, str]]:
    if tp == 1:
        return SplitInfo(frozenset(), 0), {}
    p, reasons = plan_tensor_parallel(ir, {layer: tp for layer in ir.layers})
    split = {n.name for n in p.split_dim} | {n.name for n in p.row}
    copied = {linear_parts(ir.gm, n).input for n in p.column}
    reduce_bytes = sum(ir.meta(n).output_bytes for n in copied) + sum(ir.meta(n).output_bytes for n in p.row)
    return SplitInfo(frozenset(split), reduce_bytes), reasons


def batch_size(ctx: PassContext) -> int:
    first = ctx.example_inputs[0]
    return int(first.shape[0]) if hasattr(first, "shape") and len(first.shape) else 1


def validity(ir: IR, ctx: PassContext, strategy: Strategy, reasons: dict[str, str]) -> str | None:
    batch = batch_size(ctx)
    if batch % strategy.dp:
        return f"invalid: global batch {batch} is not divisible by dp={strategy.dp}"
    blocked = [layer for layer in (ir.block_layers or ir.layers) if layer in reasons]
    if strategy.tp > 1 and blocked:
        return f"invalid: tp={strategy.tp} cannot split {blocked[0]} ({reasons[blocked[0]]})"
    return None


def evaluate(ir: IR, ctx: PassContext, strategy: Strategy) -> Candidate:
    info, reasons = split_info(ir, strategy.tp)
    problem = validity(ir, ctx, strategy, reasons)
    if problem:
        return Candidate(strategy, None, problem)
    estimate = estimate_uniform(ir, ctx.cluster, strategy, info)
    if estimate.peak_memory > estimate.memory_budget:
        return Candidate(strategy, estimate, f"out of memory: needs {estimate.peak_memory / 2**30:.2f} GiB "
                                             f"of {estimate.memory_budget / 2**30:.2f} GiB")
    return Candidate(strategy, estimate, "fits")


def candidate_strategies(num_devices: int) -> list[Strategy]:
    return [Strategy(dp=num_devices // tp, tp=tp) for tp in range(1, num_devices + 1) if num_devices % tp == 0]


@register_pass("search", kind="search")
def search(ir: IR, ctx: PassContext) -> IR:
    """Choose the fastest (dp, tp) that fits memory (or check and cost the user's forced plan)."""
    num_devices = ctx.cluster.num_devices
    if ctx.plan is not None:
        forced = ctx.plan
        unknown = [a.layer for a in forced.layers if a.layer not in ir.layers]
        if unknown:
            raise PcompileError(f"the plan names layer(s) {unknown} that this model does not have "
                                f"(its layers: {ir.layers})", "re-plan for this model, or fix the layer names")
        if forced.num_devices != num_devices:
            raise PcompileError(f"the plan is for {forced.num_devices} devices but the cluster has {num_devices}",
                                "make dp * tp * pp equal the cluster's device count")
        candidate = evaluate(ir, ctx, forced.default)
        if candidate.verdict.startswith("invalid"):
            raise PcompileError(f"forced plan {forced.default.describe()} is {candidate.verdict}",
                                "choose degrees that divide the batch, heads and hidden sizes, or pass plan=None "
                                "to let pcompile search")
        ctx.plan = dataclasses.replace(forced, estimate=candidate.estimate, candidates=(candidate,),
                                       reason="forced by the user")
        return ir
    candidates = [evaluate(ir, ctx, s) for s in candidate_strategies(num_devices)]
    fitting = [c for c in candidates if c.verdict == "fits"]
    if not fitting:
        costed = [c for c in candidates if c.estimate is not None]
        if not costed:
            raise PcompileError("no (dp, tp) split of the model is valid: "
                                + "; ".join(f"{c.strategy.describe()}: {c.verdict}" for c in candidates),
                                "change the batch size or device count so dp divides the batch")
        closest = min(costed, key=lambda c: c.estimate.peak_memory)
        raise PcompileError(
            f"the model fits nowhere: the smallest plan ({closest.strategy.describe()}) needs "
            f"{closest.estimate.peak_memory / 2**30:.2f} GiB per device, the devices have "
            f"{closest.estimate.memory_budget / 2**30:.2f} GiB",
            f"use devices with at least {closest.estimate.peak_memory / 2**30:.2f} GiB, more devices, "
            "or a smaller batch")
    best = min(fitting, key=lambda c: (c.estimate.step_time, c.strategy.tp))
    ranked = tuple(dataclasses.replace(c, verdict="chosen" if c is best else
                                       (f"slower by {c.estimate.step_time / best.estimate.step_time:.2f}x"
                                        if c.verdict == "fits" else c.verdict))
                   for c in sorted(candidates, key=_rank))
    runner_up = next((c for c in ranked if c.verdict.startswith("slower")), None)
    why = f"fastest of {len(fitting)} fitting (dp, tp) splits"
    if runner_up:
        why += f"; runner-up {runner_up.strategy.describe()} is {runner_up.verdict}"
    ctx.plan = Plan(num_devices=num_devices, default=best.strategy, estimate=best.estimate, candidates=ranked,
                    reason=why)
    return ir


def _rank(c: Candidate):
    return (c.estimate is None, c.estimate.step_time if c.estimate else 0.0, c.strategy.tp)
