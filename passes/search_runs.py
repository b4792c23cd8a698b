"""The engine runs one search makes, and the cost tables each run sees (used by passes/search.py).

A run is an engine search (pcompile.search.engine) over a SearchSpace, with a cost callback
whose tables mark as impossible what the rewrite passes cannot lower there:

- uniform runs, one per valid tp degree, every layer at that tp: every pp, sdp, sp and
  schedule the rewrites run (SUPPORTED_SPACE);
- mixed runs, each layer its own tp (MIXED_SPACE: pp = 1, no sp, as passes/reshard.py lowers
  them; dp = devices / tp degrees that divide each other). Layers that share a parameter (a
  tied embedding and LM head) are pinned to one tp per run - reshard refuses a sharded
  parameter read at different dp degrees - so there is one mixed run per tp of each such group.

"pre" / "post" layers with no parameters and no FLOPs are left out of the tables
(pcompile.cost.plan_price.trivial_ends) and follow their neighbour's strategy.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

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
MIXED_SPACE = dict(pp_degrees=(1,), sp=(False,))  # what reshard lowers for per-layer tp mixing
MAX_MIXED_RUNS = 16


def _restricted(table: CostTable, refused: dict[int, dict[str, str]], pipelined: bool, pins: dict[str, int],
                dp_one: bool) -> CostTable:
    """Strategies made impossible (time inf) where a rewrite cannot run them:
    - sp on the layers the rewrite refuses at their tp (`refused[tp]`: sp_refusals);
    - a layer of a mixed run at another tp than its tied group's (`pins`);
    - dp > 1 when the loss sums over the batch (`dp_one`)."""
    def everywhere(s: Strategy) -> bool:  # forbidden on every layer
        return dp_one and s.dp > 1

    def forbidden(layer: str, s: Strategy) -> bool:  # the layer-dependent rest
        return (s.sp and layer in refused.get(s.tp, {})) or (layer in pins and s.tp != pins[layer])

    fwd, bwd = table.fwd_time.copy(), table.bwd_time.copy()
    named = {layer for tp in refused.values() for layer in tp} | set(pins)  # layers a rule names
    candidates = [i for i, layer in enumerate(table.layers) if layer in named]
    for j, s in enumerate(table.strategies):
        rows = slice(None) if everywhere(s) else [i for i in candidates if forbidden(table.layers[i], s)]
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
            table = costs.table(query.first_rank, query.devices_per_stage, query.microbatch_size, query.strategies)
            key = (id(table), query.pp > 1, tuple(sorted(pins.items())))
            if key not in cache:
                cache[key] = trim(_restricted(table, refused, query.pp > 1, pins, dp_one))
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
                one_grouping: bool = False) -> list[tuple]:
    """(SearchSpace fields, tied-group pins, mixed?) of each engine run: one per tp with every
    layer at it (every pp, sdp, sp, schedule), then the mixed runs (each layer its own tp);
    `limits`: the user's narrowing (CompileOptions.space_limits). `dp_one`: dp = 1 and one
    micro-batch; `one_grouping`: one micro-batch and no mixed runs (one dp for every layer)."""
    user = dict(limits)
    user.pop("tp_degrees", None)
    if dp_one or one_grouping:  # several micro-batches average the loss too
        user["microbatch_counts"] = tuple(m for m in user.get("microbatch_counts", (1,)) if m == 1)
    runs = []
    uniform = narrow({}, user)
    if uniform is not None:
        runs += [({**uniform, "tp_degrees": (tp,)}, {}, False) for tp in tps]
    mixed = narrow(MIXED_SPACE, user)
    if mixed is not None and not (dp_one or one_grouping):  # dp = 1 everywhere leaves one tp: nothing to mix
        runs += [({**mixed, "tp_degrees": tuple(tps)}, pins, True) for pins in mixed_pins(tps, tied_groups(ir, layers))]
    return runs
