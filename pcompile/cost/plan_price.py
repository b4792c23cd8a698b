"""One price for a plan, whoever asks: the search's objective (pcompile.search.space.evaluate)
over the cost tables the search reads (StageCosts), for any Plan - per-layer strategies,
stages, micro-batches, schedule. The search pass prices the plans it searches this way, so
`price(...)` of a plan the search returned equals its `plan.estimate` exactly; a forced plan
gets the same treatment, its stages cut where the plan says or, when it names none, balanced
by the cost model's time per layer at the plan's strategies.

What the tables leave out: "pre" / "post" layers with no parameters and no FLOPs (only the
inputs, or only the output) are not a unit worth a strategy or a stage of their own; they are
dropped from the tables and follow their neighbour (`trivial_ends`).
"""
from __future__ import annotations

import dataclasses

from pcompile.cluster import Cluster
from pcompile.cost.layer_work import example_batch
from pcompile.cost.pricing import CostOptions
from pcompile.cost.stage_costs import StageCosts
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.plan import Estimate, LayerAssignment, Plan
from pcompile.search.costtable import CostTable
from pcompile.search.space import PlanCost, Setting, balanced_split, evaluate


def p2p_link(cluster: Cluster) -> tuple[float, float]:
    """(bandwidth, latency) of the sends between pipeline stages: across nodes when there are
    several; the latency at least the cluster's min_transfer (a send's bytes then ride on it)."""
    if cluster.num_nodes > 1:
        return cluster.inter_node_bandwidth, max(cluster.inter_node_latency, cluster.min_transfer)
    return cluster.intra_node_bandwidth, max(cluster.intra_node_latency, cluster.min_transfer)


def stage_budgets(cluster: Cluster, pp: int) -> list[float]:
    """Each stage's memory budget: its smallest device's."""
    d = cluster.num_devices // pp
    return [float(min(cluster.device_of(r).budget for r in range(k * d, (k + 1) * d))) for k in range(pp)]


def trivial_ends(ir: IR) -> tuple[bool, bool]:
    """Whether "pre" / "post" hold no parameters and no FLOPs: left out of the tables."""
    def trivial(layer: str) -> bool:
        return layer in ir.layers and ir.total("param_bytes", layer) == 0 and ir.total("flops", layer) == 0
    return trivial("pre") and len(ir.layers) > 1, trivial("post") and len(ir.layers) > 1


def priced_layers(ir: IR) -> tuple[str, ...]:
    """The layers the cost tables hold (the trivial ends dropped)."""
    drop_first, drop_last = trivial_ends(ir)
    return tuple(ir.layers)[1 if drop_first else 0:len(ir.layers) - (1 if drop_last else 0)]


def without_ends(ir: IR, table: CostTable) -> CostTable:
    """`table` without the rows of the trivial ends."""
    return ends_trimmer(ir)(table)


def ends_trimmer(ir: IR):
    """A function taking a table to `without_ends` of it, the trivial ends found once (finding
    them walks every node of the IR, and a search trims a hundred tables)."""
    drop_first, drop_last = trivial_ends(ir)

    def trim(table: CostTable) -> CostTable:
        rows = slice(1 if drop_first else 0, table.num_layers - (1 if drop_last else 0))
        edges = slice(rows.start, rows.stop - 1)
        return dataclasses.replace(
            table, layers=table.layers[rows], fwd_time=table.fwd_time[rows], bwd_time=table.bwd_time[rows],
            sync_time=table.sync_time[rows], state_memory=table.state_memory[rows],
            activation_memory=table.activation_memory[rows], temp_memory=table.temp_memory[rows],
            switch_time=table.switch_time[edges], boundary_bytes=table.boundary_bytes[edges])
    return trim


def setting_of(plan: Plan) -> Setting:
    return Setting(plan.pp, plan.num_microbatches, plan.schedule if plan.pp > 1 else "1F1B", plan.virtual_stages)


def _tables(ir: IR, costs: StageCosts, plan: Plan, microbatch: int, strategies: tuple) -> list[CostTable]:
    d = plan.num_devices // plan.pp
    return [without_ends(ir, costs.table(k * d, d, microbatch, strategies, plan.num_microbatches > 1))
            for k in range(plan.pp)]


def with_stages(ir: IR, plan: Plan, costs: StageCosts, batch: int) -> Plan:
    """`plan` with every layer listed with its stage: the plan's own stages when it gives them
    (pp > 1 and some layer past stage 0), else a balanced cut of the blocks into pp x
    virtual_stages stages by the cost model's forward + backward time of each layer at its
    strategy ("pre" in the first stage, "post" in the last)."""
    stages = plan.pp * plan.virtual_stages
    given = {a.layer: a.stage for a in plan.layers}
    if plan.pp == 1 or any(given.values()):
        full = _given_stages(ir, given, stages) if plan.pp > 1 else dict.fromkeys(ir.layers, 0)
        return dataclasses.replace(plan, layers=tuple(
            LayerAssignment(layer, plan.strategy_for(layer), full[layer]) for layer in ir.layers))
    blocks = [layer for layer in ir.layers if layer not in ("pre", "post")]
    if len(blocks) < stages:
        raise PcompileError(f"the model has {len(blocks)} layers to cut but the plan needs {stages} pipeline "
                            f"stages (pp={plan.pp} x virtual_stages={plan.virtual_stages})",
                            "use a smaller pp or virtual_stages, a non-interleaved schedule, or a model with more "
                            "blocks")
    strategies = tuple(dict.fromkeys(plan.strategy_for(layer) for layer in ir.layers))
    d = plan.num_devices // plan.pp
    table = costs.table(0, d, batch // plan.num_microbatches, strategies, plan.num_microbatches > 1)
    time = {layer: float(table.fwd_time[i, strategies.index(plan.strategy_for(layer))]
                         + table.bwd_time[i, strategies.index(plan.strategy_for(layer))])
            for i, layer in enumerate(table.layers)}
    cut = dict(zip(blocks, balanced_split([time[b] for b in blocks], stages, time.get("pre", 0.0),
                                          time.get("post", 0.0))))
    cut.update({"pre": 0, "post": stages - 1})
    return dataclasses.replace(plan, layers=tuple(LayerAssignment(layer, plan.strategy_for(layer), cut[layer])
                                                  for layer in ir.layers))


def _given_stages(ir: IR, given: dict[str, int], stages: int) -> dict[str, int]:
    """Every layer's stage from the plan's (an unlisted "pre" in the first, "post" in the last),
    checked to be a contiguous cut using every stage."""
    full = {layer: given.get(layer, 0 if layer == "pre" else stages - 1 if layer == "post" else None)
            for layer in ir.layers}
    order = [s for s in full.values() if s is not None]
    if None in full.values() or order != sorted(order) or set(order) != set(range(stages)):
        raise PcompileError(f"the plan's stages {list(full.items())} are not a contiguous cut of the layers into "
                            f"stages 0..{stages - 1}",
                            "give every layer a stage, non-decreasing along the layers, with every stage used")
    return full


def price(ir: IR, cluster: Cluster, plan: Plan, options: CostOptions, costs: StageCosts | None = None,
          batch: int | None = None) -> tuple[Estimate, PlanCost]:
    """The plan's Estimate (and the objective's terms), priced as the search prices plans.
    `batch`: the global batch (default: the plan's, else the IR's example batch); `costs`: the
    search's StageCosts when it asks, so the tables are the very ones it searched."""
    costs = costs or StageCosts(ir, cluster, options)
    batch = batch or plan.global_batch or example_batch(ir)
    plan = with_stages(ir, plan, costs, batch)
    layers = priced_layers(ir)
    strategies = tuple(dict.fromkeys(plan.strategy_for(layer) for layer in layers))
    tables = _tables(ir, costs, plan, batch // plan.num_microbatches, strategies)
    stage_of = {a.layer: a.stage for a in plan.layers}
    segments = tuple(tuple(_range(layers, stage_of, chunk * plan.pp + k) for chunk in range(plan.virtual_stages))
                     for k in range(plan.pp))
    choice = [strategies.index(plan.strategy_for(layer)) for layer in layers]
    bandwidth, latency = p2p_link(cluster)
    setting = setting_of(plan)
    cost = evaluate(setting, tables, stage_budgets(cluster, plan.pp), segments, choice, bandwidth, latency)
    return cost.estimate(setting), cost


def _range(layers: tuple[str, ...], stage_of: dict[str, int], stage: int) -> tuple[int, int]:
    """The [start, stop) indices of the priced layers in virtual stage `stage` (contiguous)."""
    at = [i for i, layer in enumerate(layers) if stage_of[layer] == stage]
    return (at[0], at[-1] + 1) if at else (0, 0)
