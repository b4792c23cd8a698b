"""Search pass: the plan, from the IR's costs, by the search engine (pcompile.search.engine).

The engine searches per-layer strategies (dp or sdp, checkpointing, operator split) under a
global pipeline setting (pp, micro-batches, schedule) and a balanced stage partition, with a
memory-knapsack DP per stage (see pcompile.search.dp for the maths). This pass states the
problem from the IR: layers, the cluster's per-rank memory, a cost callback that fills a
CostTable per stage (pcompile.cost.pricing.cost_table's, built fast by pcompile.cost.stage_costs), and a
search space restricted to what the rewrite passes can run today:

- tp must split every block (tp_rules finds the column/row Linear pairs; tp must divide the
  heads and hidden sizes). The engine runs once per valid tp degree with every layer at that
  tp, plus "mixed" runs where each layer picks its own tp (passes/search_runs.py: what each
  run may use, as the rewrites lower it). The fastest plan of all runs wins; baselines are
  merged across the runs (each family is best in the run of its own tp).
- sdp (ZeRO-3) with and without pipelining (the pipeline backend gathers sdp parameters per
  micro-batch and reduce-scatters their gradients, as the cost model charges), and GPipe,
  1F1B and interleaved 1F1B (its chunks become Plan.virtual_stages);
- sequence parallelism per layer where the sp rewrite accepts the layer (sp_refusals), inside
  pipeline stages too; ZeRO-3 with tp > 1 in pipelines (over a weight tied across stages too);
- a loss that sums over the batch or couples its samples (loss_terms) only with dp = 1 and one
  micro-batch: averaging would silently divide it; a loss with a function of batch statistics
  (a router's balancing loss) only with one micro-batch and one dp degree for every layer; batch
  norm in train mode only with one micro-batch (its statistics are synchronised over dp, not
  across micro-batches).
- a global-batch range (plan(global_batch=...)): every allowed batch is searched and the one
  with the most samples per second wins (costs scale from the example inputs' batch).

A forced plan is checked (devices, layer names, tp vs heads, batch vs dp), given a stage for
every layer (its own, or a cut balanced by the cost model) and priced like a searched one
(pcompile.cost.plan_price: one price for a plan).
"""
from __future__ import annotations

import dataclasses
import math

from pcompile.cost.plan_price import p2p_link, price, priced_layers, with_stages
from pcompile.cost.pricing import CostOptions
from pcompile.cost.stage_costs import StageCosts
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.passes.search_runs import SUPPORTED_SPACE, cost_callback, engine_runs, ep_offered
from pcompile.plan import Candidate, LayerAssignment, Plan, Strategy
from pcompile.runtime.batch_norm import trains_batch_norm
from pcompile.search.baselines import NoFit, baselines
from pcompile.search.engine import SearchContext, SearchProblem
from pcompile.search.engine import search as run_engine
from pcompile.search.result import Baseline, SearchResult, to_plan
from pcompile.search.space import SearchRules, SearchSpace, nearest_batches, tp_options
from pcompile.sharding.loss_terms import COUPLED, STATS, SUM, classified
from pcompile.sharding.sp_rules import sp_refusals
from pcompile.sharding.tp_ops import OpKinds
from pcompile.sharding.tp_rules import plan_tensor_parallel, tp_problem


def batch_size(ctx: PassContext) -> int:
    first = ctx.example_inputs[0]
    return int(first.shape[0]) if hasattr(first, "shape") and len(first.shape) else 1


def validity(ir: IR, ctx: PassContext, strategy: Strategy, pp: int = 1, microbatches: int = 1) -> str | None:
    batch = batch_size(ctx)
    if batch % (strategy.dp * microbatches):
        return (f"invalid: global batch {batch} is not divisible by dp={strategy.dp} x "
                f"{microbatches} micro-batch(es)")
    problem = tp_problem(ir, strategy.tp)  # a forced plan's sp is checked by the sp rewrite itself
    return f"invalid: {problem}" if problem else None


def _forced(ir: IR, ctx: PassContext) -> None:
    forced = ctx.plan
    num_devices = ctx.cluster.num_devices
    unknown = [a.layer for a in forced.layers if a.layer not in ir.layers]
    if unknown:
        raise PcompileError(f"the plan names layer(s) {unknown} that this model does not have "
                            f"(its layers: {ir.layers})", "re-plan for this model, or fix the layer names")
    if forced.num_devices != num_devices:
        raise PcompileError(f"the plan is for {forced.num_devices} devices but the cluster has {num_devices}",
                            "make dp * tp * pp equal the cluster's device count")
    if forced.global_batch is not None and forced.global_batch != batch_size(ctx):
        raise PcompileError(f"the plan was made for a global batch of {forced.global_batch}, the example inputs "
                            f"hold {batch_size(ctx)}", f"pass example inputs of {forced.global_batch} samples "
                            "(the batch the plan chose), or re-plan for this batch")
    problem = validity(ir, ctx, forced.default, forced.pp, forced.num_microbatches)
    if problem:
        raise PcompileError(f"forced plan {forced.default.describe()} is {problem}",
                            "choose degrees that divide the batch, heads and hidden sizes, or pass plan=None "
                            "to let pcompile search")
    costs = StageCosts(ir, ctx.cluster, cost_options(ctx))
    if forced.default.ep > 1 or any(a.strategy.ep > 1 for a in forced.layers):
        for layer, (shape, _) in costs.moe.items():
            ep = forced.strategy_for(layer).ep
            if shape.num_experts % ep:  # as the expert_parallel rewrite refuses it, before pricing
                raise PcompileError(f"expert parallelism (ep={ep}) in layer {layer!r}: {shape.num_experts} experts "
                                    f"do not split over {ep} ranks",
                                    f"choose ep among the divisors of {shape.num_experts}")
    staged = with_stages(ir, forced, costs, batch_size(ctx))
    estimate, _ = price(ir, ctx.cluster, staged, cost_options(ctx), costs, batch_size(ctx))
    ctx.plan = dataclasses.replace(staged, estimate=estimate, reason="forced by the user",
                                   candidates=(Candidate(forced.default, estimate, "forced"),))


def cost_options(ctx: PassContext) -> CostOptions:
    """How the search and forced plans are costed: as the runtime runs them."""
    return CostOptions.runtime(ctx.options.mixed_precision is not None, ctx.options.offload_optimizer)


def _with_ends(ir: IR, plan: Plan) -> Plan:
    """Give the left-out trivial "pre" / "post" their neighbour's strategy and stage."""
    layers = list(plan.layers)
    drop_first, drop_last = layers[0].layer != ir.layers[0], layers[-1].layer != ir.layers[-1]
    # without sp: a trivial end has no ops for sp to shard, and the rewrite refuses sp on a
    # layer without tp collectives unless it can borrow a single sequence length
    # nor ep: a trivial end holds no mixture of experts
    if drop_first:
        layers.insert(0, LayerAssignment("pre", dataclasses.replace(layers[0].strategy, sp=False, ep=1),
                                         layers[0].stage))
    if drop_last:
        layers.append(LayerAssignment("post", dataclasses.replace(layers[-1].strategy, sp=False, ep=1),
                                      layers[-1].stage))
    return dataclasses.replace(plan, layers=tuple(layers))


def _merge_baselines(found: list[tuple[Baseline, ...]]) -> tuple[Baseline, ...]:
    """Each baseline family at its best over the runs' baselines (a run where nothing fits
    brings its families' leanest peaks)."""
    merged = {}
    for b in (b for run in found for b in run):
        if b.name not in merged or (b.step_time, b.peak_memory) < (merged[b.name].step_time,
                                                                    merged[b.name].peak_memory):
            merged[b.name] = b
    return tuple(merged.values())


def _batch_fix(ctx: PassContext, batches, layers: tuple[str, ...], space: SearchSpace | None, rules) -> str:
    """How to change the global batch: the nearest ones the devices split (pcompile.search.space)."""
    cluster = ctx.cluster
    near = sorted({b for batch in batches for b in nearest_batches(cluster.num_devices, cluster.devices_per_node,
                                                                    batch, layers, space, rules)}) if space else []
    if not near:
        return ""
    nearest = f"the nearest that work are {near[0]} and {near[1]}" if len(near) > 1 else \
        f"the nearest that works is {near[0]}"
    return (f"use a global batch divisible by the data-parallel degree (devices / tp): {nearest} (e.g. pcompile "
            f"plan --batch {near[-1]}, or example inputs of {near[-1]} samples)")


def _no_plan(ctx: PassContext, tps: list[int], rejected: dict, errors: list, summed, batches,
             batch_fix: str = "") -> PcompileError:
    skipped = "; ".join(r for r in rejected.values() if r)
    if summed:
        terms = ", ".join(f"{t.node.name} = {t.how}" for t in summed)
        searched = f"tp={tps}" + (f" ({errors[0].cause})" if errors else "") + (f"; {skipped}" if skipped else "")
        return PcompileError(f"the loss is not an average over the batch ({terms}), so only plans without data "
                             f"parallelism or micro-batches are exact, and none runs on this cluster: searched "
                             f"{searched}",
                             "use a mean loss (reduction='mean', or divide the sum by the batch size), or a "
                             "cluster whose node holds the model at tp = devices")
    memory = [e for e in errors if "memory" in str(e)]
    if memory:  # the verdict of the run whose leanest plan needs the least memory, naming that need
        return min(memory, key=lambda e: getattr(e, "need", math.inf))
    if errors and batch_fix:
        return PcompileError(
            f"no plan is valid for {ctx.cluster.num_devices} devices and a global batch of "
            f"{' / '.join(map(str, batches))}: searched tp={tps}, where no data-parallel degree (with every pipeline "
            f"depth and micro-batch count) divides the batch's micro-batches", batch_fix)
    if errors:
        return PcompileError(
            f"no plan is valid for {ctx.cluster.num_devices} devices and a global batch of "
            f"{' / '.join(map(str, batches))}: "
            f"searched tp={tps}, where {errors[0].cause}" + (f"; not searched: {skipped}" if skipped else ""),
            (batch_fix or "use a global batch divisible by the data-parallel degree (devices / tp)")
            + ", or a device count the heads and hidden sizes divide")
    return PcompileError("no tensor-parallel degree splits this model on this cluster: " + skipped,
                         "use a device count the heads divide")


def _search_at(batch: int, runs: list[tuple], problem: dict, cost) -> tuple[list[SearchResult], list[PcompileError],
                                                                             list[tuple[Baseline, ...]]]:
    """Every engine run's result, error and baselines at this global batch; `problem`: the
    SearchProblem fields every run shares. Branch and bound across runs: the uniform runs
    without ep go most promising first (_promise), and each after the first
    (like every mixed run) looks only for plans faster than the best so far, so a run that
    cannot win is cut by its bounds before its exact DPs (Llama-2-70B on 64 devices searches in
    half the time); its baselines are priced all the same (each family's best is over every
    uniform run). Mixed runs bring no baselines."""
    results, errors, found, queued = [], [], [], []
    for fields, pins, mixed in runs:
        try:
            context = SearchContext(SearchProblem(**problem, global_batch=batch, cost=cost(pins),
                                                  space=SearchSpace(**{**SUPPORTED_SPACE, **fields})))
            bounded = not mixed and "ep" not in fields
            # (first the uniform runs without ep, most promising first; then the others as given)
            order = (0, _promise(context)) if bounded else (1, 0.0)
            queued.append((order, len(queued), context, bounded, mixed))
        except PcompileError as exc:
            errors.append(exc)
    for _, _, context, bounded, mixed in sorted(queued, key=lambda q: q[:2]):
        faster_than = min((r.step_time for r in results), default=math.inf) if bounded or mixed else math.inf
        try:
            result = run_engine(context.problem, faster_than, context)
        except PcompileError as exc:
            errors.append(exc)
            found += [exc.baselines] if isinstance(exc, NoFit) else []
            continue
        results += [result] if result is not None else []
        if mixed:
            continue
        if result is not None and result.baselines:
            found.append(result.baselines)
        else:  # a run bounded by the best so far: its baselines, the pipeline_even only if faster (merged by the least)
            even = min((b.step_time for run in found for b in run if b.name == "pipeline_even"), default=math.inf)
            found.append(baselines(context, pipeline_even_below=even))
    return results, errors, found


def _promise(context: SearchContext) -> float:
    """Which uniform run goes first: the least value of a real plan (even stages, the DP's
    unrestricted states: SettingSolver.even_upper) over the run's three settings of least lower
    bound - the lower bounds alone put Llama-2-70B's tp=4 before the tp=8 that wins. Their DP
    states are the run's own, kept in its context; inf when nothing can run."""
    cells = context.problem.grid_cells
    return min((context.solver(setting, cells, True).even_upper() for bound, setting in context.ordered()[:3]
                if math.isfinite(bound)), default=math.inf)


def _batch_report(outcomes: dict, chosen: int) -> str:
    """One line per searched global batch: its throughput, or why it has no plan."""
    lines = ["global batch (the range allowed): the most samples per second wins"]
    for batch, (results, errors, _) in outcomes.items():
        if results:
            step = min(r.step_time for r in results)
            lines.append(f"  {batch:>6}: {batch / step:,.1f} samples/s (step {step * 1e3:.2f} ms)"
                         + ("  <- chosen" if batch == chosen else ""))
        else:
            lines.append(f"  {batch:>6}: no plan ({errors[0].cause if errors else 'no valid strategy'})")
    return "\n".join(lines)


def _ep_report(experts: dict, offer: dict, limit, results: list[SearchResult], summed: bool) -> str:
    """What the search did with expert parallelism: the degrees offered, and the best plan with
    and without ep (the runs at the chosen batch)."""
    counts = sorted({count for count, _ in experts.values()})
    head = (f"expert parallelism: {len(experts)} MoE layer(s) ({'/'.join(map(str, counts))} experts); ")
    degrees = sorted({e for es in offer.values() for e in es})
    if not degrees:
        why = ("the loss allows no data parallelism" if summed else "turned off by search_space ep" if limit
               is not None and not any(e > 1 for e in limit) else "no ep > 1 divides both the experts and dp")
        return head + f"ep not offered ({why})"
    def best(with_ep: bool):
        found = [r for r in results if any(c.strategy.ep > 1 for c in r.layers) == with_ep]
        return min(found, key=lambda r: r.step_time) if found else None
    text = head + (f"offered ep {degrees} on them, one engine run per degree besides the run without ep (one "
                   "ep degree per plan), the fastest kept")
    ep, other = best(True), best(False)
    if ep is not None:
        text += f"; best with ep: {ep.step_time * 1e3:.2f} ms"
    else:
        text += "; ep did not pay (every ep run's best plan kept ep = 1)"
    if other is not None:
        text += f"; best without: {other.step_time * 1e3:.2f} ms"
    return text


def searched_plan(ir: IR, ctx: PassContext) -> tuple[Plan, SearchResult]:
    cluster = ctx.cluster
    # only the degrees the engine's rules allow (within a node, powers of two): asking tp_rules
    # about tp=1024 on a 1024-device cluster costs a second per degree on a 96-block model
    tps = tp_options(cluster.num_devices, cluster.devices_per_node, SearchSpace(), SearchRules())
    wanted = ctx.options.space_limits.get("tp_degrees")
    tps = [t for t in tps if wanted is None or t in wanted]
    kinds = OpKinds(ir.gm)  # the graph's op kinds, found once for every degree
    planned = {t: plan_tensor_parallel(ir, {layer: t for layer in ir.layers}, kinds) for t in tps if t > 1}
    rejected = {t: tp_problem(ir, t, planned.get(t)) for t in tps}
    tps = [t for t in tps if rejected[t] is None]
    refused = {t: sp_refusals(ir, t, planned[t][0]) for t in tps if t > 1}
    terms = classified(ir, ctx.example_inputs)
    summed = [t for t in terms if t.kind in (SUM, COUPLED)]
    statistics = any(t.kind == STATS for t in terms)  # exact under one dp grouping and one micro-batch
    # a stage sees one micro-batch at a time: batch norm's statistics would be a micro-batch's
    batch_norm = trains_batch_norm(ir.gm)
    limits = {**ctx.options.space_limits, "microbatch_counts": (1,)} if batch_norm else ctx.options.space_limits
    costs = StageCosts(ir, cluster, cost_options(ctx), planned)
    cost = cost_callback(ir, costs, refused, dp_one=bool(summed))
    layers = priced_layers(ir)
    experts = {layer: (shape.num_experts, not shape.dense) for layer, (shape, _) in costs.moe.items()}
    offer = ep_offered(experts, cluster.num_devices, tps, limits.get("ep"), bool(summed))
    runs = engine_runs(ir, limits, tps, layers, bool(summed), one_grouping=statistics, ep_offer=offer)
    bandwidth, latency = p2p_link(cluster)
    problem = dict(
        layers=layers, num_devices=cluster.num_devices, devices_per_node=cluster.devices_per_node,
        device_memory=tuple(float(cluster.device_of(r).budget) for r in range(cluster.num_devices)),
        p2p_bandwidth=bandwidth, p2p_latency=latency,
        # one micro-batch is all a summed loss allows: pp > 1 then still divides the memory
        rules=SearchRules(microbatches_at_least_pp=not (summed or statistics or batch_norm)))
    batches = ctx.options.global_batches or (batch_size(ctx),)
    outcomes = {b: _search_at(b, runs, problem, cost) for b in batches}
    found = {b: min(results, key=lambda r: (r.step_time, r.peak_memory)) for b, (results, _, _) in outcomes.items()
             if results}
    if not found:
        errors = [e for _, errors, _ in outcomes.values() for e in errors]
        fix = ""
        if errors and not summed and not any("memory" in str(e) for e in errors):
            space = SearchSpace(**{**SUPPORTED_SPACE, **runs[0][0], "tp_degrees": tuple(tps)}) if runs else None
            fix = _batch_fix(ctx, batches, layers, space, problem["rules"])
        raise _no_plan(ctx, tps, rejected, errors, summed, batches, fix)
    batch = max(found, key=lambda b: (b / found[b].step_time, -b))  # samples per second; on a tie the smaller
    best = dataclasses.replace(found[batch], baselines=_merge_baselines(outcomes[batch][2]))
    plan = _with_ends(ir, to_plan(best, model=ctx.fingerprint))
    notes = [r for r in rejected.values() if r]
    explanation = best.explain() + ("\nnot searched: " + "; ".join(notes) if notes else "")
    if summed:
        explanation += ("\nthe loss is not an average over the batch (a sum, or batch-coupled): searched dp = 1 "
                        "and one micro-batch only (loss_check)")
    elif statistics:
        explanation += ("\nthe loss reads batch statistics (batch_statistics reduces them over dp): searched one "
                        "micro-batch and one dp degree for every layer only")
    if batch_norm:
        explanation += "\nbatch norm in train mode: searched one micro-batch only (its statistics are the batch's)"
    if experts:
        explanation += "\n" + _ep_report(experts, offer, limits.get("ep"), outcomes[batch][0], bool(summed))
    if len(batches) > 1:
        explanation += "\n" + _batch_report(outcomes, batch)
    return dataclasses.replace(plan, explanation=explanation, global_batch=batch), best


@register_pass("search", kind="search", requires=("flops", "memory", "layers"), ensures=("plan",))
def search(ir: IR, ctx: PassContext) -> IR:
    """Search per-layer strategies, pipeline stages and micro-batches (or check a forced plan)."""
    if ctx.plan is not None:
        _forced(ir, ctx)
        return ir
    ctx.plan, ctx.search_result = searched_plan(ir, ctx)
    if ctx.options.offload_optimizer:  # priced offloaded (cost_options), run offloaded
        ctx.plan = dataclasses.replace(ctx.plan, offload_optimizer=True)
    if not math.isfinite(ctx.search_result.step_time):
        raise PcompileError("the search returned no finite plan", "this is a pcompile bug; please report it")
    return ir
