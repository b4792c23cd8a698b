"""The engine runs one search makes, and the cost tables each run sees (used by passes/search.py).

A run is an engine search (pcompile.search.engine) over a SearchSpace, with a cost callback
whose tables mark as impossible what the rewrite passes cannot lower there:

- uniform runs, one per valid tp degree, every layer at that tp: every pp, sdp, sp and
  schedule the rewrites run (SUPPORTED_SPACE);
- mixed runs, each layer its own tp (MIXED_SPACE: no sp, as passes/reshard.py lowers them, in
  pipeline stages too; dp = devices / pp / tp degrees that divide each other). Layers that share a parameter (a
  tied embedding and LM head) are pinned to one tp per run - reshard refuses a sharded
  parameter read at different dp degrees - so there is one mixed run per tp of each such group.
- expert parallelism (models with a mixture of experts ep can run: pcompile.cost.moe.ep_layers):
  the runtime runs one ep degree per plan, which per-layer choices cannot enforce, so a uniform
  run at tp is followed by one run per ep degree offered at tp (its strategies ep = 1 and
  ep = e), the fastest plan of all runs kept. ep > 1 is impossible in the tables' rows of the
  layers without a mixture or whose experts it does not divide. Mixed runs get no ep (the expert
  groups are built on the default dp grouping).

"pre" / "post" layers with no parameters and no FLOPs are left out of the tables
(pcompile.cost.plan_price.trivial_ends) and follow their neighbour's strategy.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from pcompile.cost.moe import ep_degrees
from pcompile.cost.plan_price import ends_trimmer
from pcompile.cost.stage_costs import StageCosts
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.params import param_layers
from pcompile.plan import Strategy
from pcompile.search.costtable import CostTable
from pcompile.search.engine import StageQuery
from pcompile.search.space import SearchSpace

# What the rewrite passes can run (see the module docstring).
SUPPORTED_SPACE = dict(schedules=("1F1B", "GPipe", "Interleaved1F1B"))
MIXED_SPACE = dict(sp=(False,))  # what reshard lowers for per-layer tp mixing (every pp)
MAX_MIXED_RUNS = 16


def _restricted(table: CostTable, refused: dict[int, dict[str, str]], pipelined: bool, pins: dict[str, int],
                dp_one: bool, experts: dict | None = None) -> CostTable:
    """Strategies made impossible (time inf) where a rewrite cannot run them:
    - sp on the layers the rewrite refuses at their tp (`refused[tp]`: sp_refusals);
    - a layer of a mixed run at another tp than its tied group's (`pins`);
    - dp > 1 when the loss sums over the batch (`dp_one`);
    - ep > 1 on a layer without a mixture of experts ep runs (`experts`: layer -> (E, batched)),
      or whose E it does not divide."""
    def everywhere(s: Strategy) -> bool:  # forbidden on every layer
        return dp_one and s.dp > 1

    def forbidden(layer: str, s: Strategy) -> bool:  # the layer-dependent rest
        return (s.sp and layer in refused.get(s.tp, {})) or (layer in pins and s.tp != pins[layer])

    def no_ep(layer: str, s: Strategy) -> bool:
        found = (experts or {}).get(layer)
        return found is None or found[0] % s.ep != 0

    fwd, bwd = table.fwd_time.copy(), table.bwd_time.copy()
    named = {layer for tp in refused.values() for layer in tp} | set(pins)  # layers a rule names
    candidates = [i for i, layer in enumerate(table.layers) if layer in named]
    for j, s in enumerate(table.strategies):
        rows = slice(None) if everywhere(s) else [i for i in candidates if forbidden(table.layers[i], s)]
        if s.ep > 1 and not everywhere(s):
            rows = sorted(set(rows) | {i for i, layer in enumerate(table.layers) if no_ep(layer, s)})
        fwd[rows, j] = bwd[rows, j] = np.inf
    return dataclasses.replace(table, fwd_time=fwd, bwd_time=bwd)


def cost_callback(ir: IR, costs: StageCosts, refused: dict[int, dict[str, str]], dp_one: bool):
    """A factory of cost callbacks, one per engine run (its tied-group `pins`): tables of
    pcompile.cost.pricing.cost_table, built by StageCosts (shared per-tp layer work, one table
    per class of equivalent stages) and kept per table so the engine's index memo hits."""
    cache: dict[tuple, CostTable] = {}
    trim = ends_trimmer(ir)

    def for_run(pins: dict[str, int]):
        def cost(query: StageQuery) -> CostTable:
            table = costs.table(query.first_rank, query.devices_per_stage, query.microbatch_size, query.strategies,
                                query.microbatches > 1)
            key = (id(table), query.pp > 1, tuple(sorted(pins.items())))
            if key not in cache:
                # the MoE layers (found by StageCosts when first asked) only matter to ep > 1
                experts = {layer: (shape.num_experts, not shape.dense) for layer, (shape, _) in costs.moe.items()} \
                    if any(s.ep > 1 for s in query.strategies) else {}
                cache[key] = trim(_restricted(table, refused, query.pp > 1, pins, dp_one, experts))
            return cache[key]
        return cost
    return for_run


def tied_groups(ir: IR, layers: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The searched layers that read one parameter (a tied embedding and LM head), grouped: the
    reshard rewrite needs such layers at one (dp, tp), a sharded parameter being read at one dp."""
    groups: list[set[str]] = []
    for readers in param_layers(ir).values():
        group = {layer for layer in readers if layer in layers}
        if len(group) < 2:
            continue
        for other in [g for g in groups if g & group]:
            groups.remove(other)
            group |= other
        groups.append(group)
    return [tuple(sorted(g, key=layers.index)) for g in groups]


def mixed_pins(tps: list[int], groups: list[tuple[str, ...]]) -> list[dict[str, int]]:
    """One mixed run per combination of a tp for each tied group (all groups at one tp each
    when the combinations would be more than MAX_MIXED_RUNS); [] when the tps cannot mix:
    fewer than two, or dp = devices / tp degrees that do not divide each other (reshard
    regroups a batch split into a parts into b only when one divides the other)."""
    chain = sorted(tps)
    if len(chain) < 2 or any(b % a for a, b in zip(chain, chain[1:])):
        return []
    combos = list(itertools.product(chain, repeat=len(groups)))
    if len(combos) > MAX_MIXED_RUNS:
        combos = [(tp,) * len(groups) for tp in chain]
    return [{layer: tp for group, tp in zip(groups, combo) for layer in group} for combo in combos]


def narrow(space: dict, user: dict) -> dict | None:
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
                            "use fields of pcompile.search.space.SearchSpace (pp_degrees, tp_degrees, checkpoint, ...)")
    return merged


def engine_runs(ir: IR, limits: dict, tps: list[int], layers: tuple[str, ...], dp_one: bool,
                one_grouping: bool = False, ep_offer: dict[int, tuple[int, ...]] | None = None) -> list[tuple]:
    """(SearchSpace fields, tied-group pins, mixed?) of each engine run: one per tp with every
    layer at it (every pp, sdp, sp, schedule), each followed by one per ep degree `ep_offer[tp]`
    offers at that tp (ep_offered), then the mixed runs (each layer its own tp, no ep);
    `limits`: the user's narrowing (CompileOptions.space_limits). `dp_one`: dp = 1 and one
    micro-batch; `one_grouping`: one micro-batch and no mixed runs (one dp for every layer)."""
    user = dict(limits)
    user.pop("tp_degrees", None)
    user.pop("ep", None)  # ep_offer has it
    if dp_one or one_grouping:  # several micro-batches average the loss too
        user["microbatch_counts"] = tuple(m for m in user.get("microbatch_counts", (1,)) if m == 1)
    runs = []
    uniform = narrow({}, user)
    if uniform is not None:
        for tp in tps:
            degrees = (ep_offer or {}).get(tp, ())
            # the run without ep first: its plan is the explanation's "best without ep" (and wins ties)
            runs += [({**uniform, "tp_degrees": (tp,)}, {}, False)]
            runs += [({**uniform, "tp_degrees": (tp,), "ep": (1, e)}, {}, False) for e in degrees]
    mixed = narrow(MIXED_SPACE, user)
    if mixed is not None and not (dp_one or one_grouping):  # dp = 1 everywhere leaves one tp: nothing to mix
        runs += [({**mixed, "tp_degrees": tuple(tps)}, pins, True) for pins in mixed_pins(tps, tied_groups(ir, layers))]
    return runs


def ep_offered(experts: dict, num_devices: int, tps: list[int], limit: tuple | None, dp_one: bool) -> dict:
    """{tp: the ep > 1 a search at tp offers}: those dividing the experts of some MoE layer ep
    runs (`experts`: layer -> (E, batched)) and the largest dp at that tp (devices / tp); within
    the user's search_space ep (`limit`; (1,) turns ep off); none when the loss allows no data
    parallelism (`dp_one`)."""
    if dp_one or not experts:
        return {}
    out = {}
    for tp in tps:
        dp = num_devices // tp
        degrees = sorted({e for count, _ in experts.values() for e in ep_degrees(count, dp)})
        out[tp] = tuple(e for e in degrees if limit is None or e in limit)
    return out
