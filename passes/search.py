"""Search pass: the plan, from the IR's costs, by the search engine (pcompile.search_engine).

The engine searches per-layer strategies (dp or sdp, checkpointing, operator split) under a
global pipeline setting (pp, micro-batches, schedule) and a balanced stage partition, with a
memory-knapsack DP per stage (see pcompile.search_dp for the maths). This pass states the
problem from the IR: layers, the cluster's per-rank memory, a cost callback that fills a
CostTable per stage (pcompile.cost.cost_table's, built fast by pcompile.stage_costs), and a
search space restricted to what the rewrite passes can run today:

- tp must split every block (tp_rules finds the column/row Linear pairs; tp must divide the
  heads and hidden sizes) and is the same for every layer, because the backend builds one
  (pp, dp, tp) mesh. So the engine runs once per valid tp degree and the fastest wins;
  baselines are merged across the runs (each family is best in the run of its own tp).
- sdp (ZeRO-3) with and without pipelining (the pipeline backend gathers sdp parameters per
  micro-batch and reduce-scatters their gradients, as the cost model charges), and GPipe,
  1F1B and interleaved 1F1B (its chunks become Plan.virtual_stages);
- sequence parallelism per layer where the sp rewrite accepts the layer (sp_refusals), with
  pp = 1 only.

A forced plan is checked (devices, layer names, tp vs heads, batch vs dp) and costed by the
uniform estimate.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from pcompile.cost import CostOptions, estimate_uniform
from pcompile.costtable import CostTable
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.passes.sequence_parallel import planned_shapes, sequence_length, sp_problem
from pcompile.passes.tp_rules import plan_tensor_parallel
from pcompile.passmanager import PassContext, register_pass
from pcompile.plan import Candidate, LayerAssignment, Plan, Strategy
from pcompile.search_engine import SearchProblem, StageQuery, search as run_engine
from pcompile.search_result import SearchResult, to_plan
from pcompile.search_space import SearchRules, SearchSpace, tp_options
from pcompile.stage_costs import StageCosts

# What the rewrite passes can run (see the module docstring).
SUPPORTED_SPACE = dict(schedules=("1F1B", "GPipe", "Interleaved1F1B"))


def sp_refusals(ir: IR, tp: int, p=None) -> dict[str, str]:
    """Per layer, why the sequence_parallel rewrite would refuse sp at this tp (from the shapes
    tp_rules' propagation `p` gives its collectives: [b, h] MLPs, GPT-2's flattened Conv1D
    tokens, a sequence tp does not divide). A layer without tp collectives is refused too: the
    rewrite borrows the other sp layers' sequence length for it, which the per-layer DP cannot
    promise (and sp there only shards a few token-wise ops)."""
    if tp == 1:
        return {}
    if p is None:
        p, _ = plan_tensor_parallel(ir, {layer: tp for layer in ir.layers})
    out = {}
    for layer in ir.layers:
        shapes = planned_shapes(ir, p, layer)
        if sequence_length(*shapes) is None:
            out[layer] = f"layer {layer!r} has no tensor-parallel collective for sp to replace"
        elif problem := sp_problem(*shapes, layer, tp):
            out[layer] = problem
    return out


def batch_size(ctx: PassContext) -> int:
    first = ctx.example_inputs[0]
    return int(first.shape[0]) if hasattr(first, "shape") and len(first.shape) else 1


def tp_problem(ir: IR, tp: int, planned=None) -> str | None:
    """Why tp cannot split this model's blocks, or None (`planned`: plan_tensor_parallel's answer)."""
    if tp == 1:
        return None
    _, reasons = planned or plan_tensor_parallel(ir, {layer: tp for layer in ir.layers})
    blocks = ir.block_layers or [layer for layer in ir.layers if layer not in ("pre", "post")]
    for layer in blocks:
        if layer in reasons:
            return f"tp={tp} cannot split {layer} ({reasons[layer]})"
    return None


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
    problem = validity(ir, ctx, forced.default, forced.pp, forced.num_microbatches)
    if problem:
        raise PcompileError(f"forced plan {forced.default.describe()} is {problem}",
                            "choose degrees that divide the batch, heads and hidden sizes, or pass plan=None "
                            "to let pcompile search")
    estimate = estimate_uniform(ir, ctx.cluster, forced.default,
                                CostOptions(mixed_precision=bool(ctx.options.get("mixed_precision"))))
    ctx.plan = dataclasses.replace(forced, estimate=estimate,
                                   candidates=(Candidate(forced.default, estimate, "forced"),),
                                   reason="forced by the user")


def trivial_ends(ir: IR) -> tuple[bool, bool]:
    """Whether "pre" / "post" hold no parameters and no FLOPs (only inputs, or only the output):
    such a layer is not a unit worth a strategy or a pipeline stage of its own, so the search
    leaves it out and it follows its neighbour."""
    def trivial(layer: str) -> bool:
        return layer in ir.layers and ir.total("param_bytes", layer) == 0 and ir.total("flops", layer) == 0
    return trivial("pre") and len(ir.layers) > 1, trivial("post") and len(ir.layers) > 1


def _without_ends(table: CostTable, drop_first: bool, drop_last: bool) -> CostTable:
    rows = slice(1 if drop_first else 0, table.num_layers - (1 if drop_last else 0))
    edges = slice(rows.start, rows.stop - 1)
    return dataclasses.replace(
        table, layers=table.layers[rows], fwd_time=table.fwd_time[rows], bwd_time=table.bwd_time[rows],
        sync_time=table.sync_time[rows], state_memory=table.state_memory[rows],
        activation_memory=table.activation_memory[rows], temp_memory=table.temp_memory[rows],
        switch_time=table.switch_time[edges], boundary_bytes=table.boundary_bytes[edges])


def _without_sp(table: CostTable, refused: dict[int, dict[str, str]], pipelined: bool) -> CostTable:
    """sp strategies made impossible (time inf) on the layers the rewrite refuses at their tp
    (`refused[tp]`: sp_refusals), and on every layer of a pipelined plan (sp across pipeline
    stages is not run by any test yet); so is sdp with tp > 1 in a pipelined plan (exact for
    untied models, but refused by sharded_data_parallel where such layers read a tied weight)."""
    fwd, bwd = table.fwd_time.copy(), table.bwd_time.copy()
    for j, s in enumerate(table.strategies):
        if s.sp or (pipelined and s.sdp and s.tp > 1):
            rows = [i for i, layer in enumerate(table.layers)
                    if pipelined or layer in refused.get(s.tp, {})]
            fwd[rows, j] = bwd[rows, j] = np.inf
    return dataclasses.replace(table, fwd_time=fwd, bwd_time=bwd)


def _cost_callback(ir: IR, ctx: PassContext, refused: dict[int, dict[str, str]]):
    """Tables of pcompile.cost.cost_table, built by StageCosts (shared per-tp layer work, one
    table per class of equivalent stages) and kept per table so the engine's index memo hits;
    `refused[tp]`: sp_refusals."""
    costs = StageCosts(ir, ctx.cluster, CostOptions(mixed_precision=bool(ctx.options.get("mixed_precision"))))
    cache: dict[tuple[int, bool], CostTable] = {}
    drop_first, drop_last = trivial_ends(ir)

    def cost(query: StageQuery) -> CostTable:
        table = costs.table(query.first_rank, query.devices_per_stage, query.microbatch_size, query.strategies)
        key = (id(table), query.pp > 1)
        if key not in cache:
            cache[key] = _without_ends(_without_sp(table, refused, query.pp > 1), drop_first, drop_last)
        return cache[key]
    return cost


def _with_ends(ir: IR, plan: Plan) -> Plan:
    """Give the left-out trivial "pre" / "post" their neighbour's strategy and stage."""
    drop_first, drop_last = trivial_ends(ir)
    layers = list(plan.layers)
    # without sp: a trivial end has no ops for sp to shard, and the rewrite refuses sp on a
    # layer without tp collectives unless it can borrow a single sequence length
    if drop_first:
        layers.insert(0, LayerAssignment("pre", dataclasses.replace(layers[0].strategy, sp=False), layers[0].stage))
    if drop_last:
        layers.append(LayerAssignment("post", dataclasses.replace(layers[-1].strategy, sp=False), layers[-1].stage))
    return dataclasses.replace(plan, layers=tuple(layers))


def _narrow(space: dict, user: dict) -> dict | None:
    """`space` intersected with the user's restrictions (None when they leave nothing)."""
    try:
        fields = {**SUPPORTED_SPACE, **space}
        merged = dict(space)
        for key, values in user.items():
            allowed = tuple(v for v in values if key not in fields or v in fields[key])
            if not allowed:
                return None
            merged[key] = allowed
        SearchSpace(**{**SUPPORTED_SPACE, **merged})
    except TypeError as exc:
        raise PcompileError(f"unknown search_space option: {exc}",
                            "use fields of pcompile.search_space.SearchSpace (pp_degrees, tp_degrees, checkpoint, ...)")
    return merged


def _merge_baselines(results: list[SearchResult]):
    merged = {}
    for result in results:
        for b in result.baselines:
            if b.name not in merged or (b.step_time, b.peak_memory) < (merged[b.name].step_time,
                                                                        merged[b.name].peak_memory):
                merged[b.name] = b
    return tuple(merged[b.name] for b in results[0].baselines)


def searched_plan(ir: IR, ctx: PassContext) -> tuple[Plan, SearchResult]:
    cluster = ctx.cluster
    devices = cluster.num_devices
    # only the degrees the engine's rules allow (within a node, powers of two): asking tp_rules
    # about tp=1024 on a 1024-device cluster costs a second per degree on a 96-block model
    tps = tp_options(devices, cluster.devices_per_node, SearchSpace(), SearchRules())
    planned = {t: plan_tensor_parallel(ir, {layer: t for layer in ir.layers}) for t in tps if t > 1}
    rejected = {t: tp_problem(ir, t, planned.get(t)) for t in tps}
    refused = {t: sp_refusals(ir, t, planned[t][0]) for t in planned if rejected[t] is None}
    cost = _cost_callback(ir, ctx, refused)
    results, errors = [], []
    drop_first, drop_last = trivial_ends(ir)
    layers = tuple(ir.layers)[1 if drop_first else 0:len(ir.layers) - (1 if drop_last else 0)]
    user = dict(ctx.options.get("search_space", {}))
    if "tp_degrees" in user:
        wanted = user.pop("tp_degrees")
        tps = [t for t in tps if t in wanted]
    extra = _narrow({}, user)  # one engine run per tp covers every pp, with and without sdp
    for tp in [t for t in tps if rejected[t] is None and extra is not None]:
        problem = SearchProblem(
            layers=layers, num_devices=devices, devices_per_node=cluster.devices_per_node,
            global_batch=batch_size(ctx), cost=cost,
            device_memory=tuple(float(cluster.device_of(r).memory_bytes) for r in range(devices)),
            p2p_bandwidth=cluster.inter_node_bandwidth if cluster.num_nodes > 1 else cluster.intra_node_bandwidth,
            p2p_latency=cluster.inter_node_latency if cluster.num_nodes > 1 else cluster.intra_node_latency,
            space=SearchSpace(**{**SUPPORTED_SPACE, "tp_degrees": (tp,), **extra}))
        try:
            results.append(run_engine(problem))
        except PcompileError as exc:
            errors.append(exc)
    if not results:
        skipped = "; ".join(r for r in rejected.values() if r)
        memory = [e for e in errors if "memory" in str(e)]
        if memory:  # the memory verdict names the minimum memory that would fit
            raise min(memory, key=lambda e: len(str(e)))
        if errors:
            raise PcompileError(
                f"no plan is valid for {devices} devices and a global batch of {batch_size(ctx)}: searched tp="
                f"{[t for t in tps if rejected[t] is None]}, where {errors[0].cause}"
                + (f"; not searched: {skipped}" if skipped else ""),
                "use a global batch divisible by the data-parallel degree (devices / tp), or a device count "
                "the heads and hidden sizes divide")
        raise PcompileError("no tensor-parallel degree splits this model on this cluster: "
                            + "; ".join(r for r in rejected.values() if r), "use a device count the heads divide")
    best = min(results, key=lambda r: (r.step_time, r.peak_memory))
    best = dataclasses.replace(best, baselines=_merge_baselines(results))
    plan = _with_ends(ir, to_plan(best, model=ctx.options.get("fingerprint", "")))
    skipped = [r for r in rejected.values() if r]
    explanation = best.explain() + ("\nnot searched: " + "; ".join(skipped) if skipped else "")
    return dataclasses.replace(plan, explanation=explanation), best


@register_pass("search", kind="search")
def search(ir: IR, ctx: PassContext) -> IR:
    """Search per-layer strategies, pipeline stages and micro-batches (or check a forced plan)."""
    if ctx.plan is not None:
        _forced(ir, ctx)
        return ir
    ctx.plan, result = searched_plan(ir, ctx)
    ctx.options["search_result"] = result
    if not math.isfinite(result.step_time):
        raise PcompileError("the search returned no finite plan", "this is a pcompile bug; please report it")
    return ir
