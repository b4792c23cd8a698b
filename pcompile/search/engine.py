"""The plan search's entry point: `search(SearchProblem) -> SearchResult`.

The caller states the problem (layers, devices, batch, per-rank memory, a callback that
returns the CostTable of any stage, the space and the pruning rules); the search asks for
the tables of every setting, runs the DPs of pcompile.search.dp with branch and bound over
settings, certifies the optimum on the memory grid, and returns the plan with per-layer
explanation and the baselines of pcompile.search.baselines.
"""
from __future__ import annotations

import functools
import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pcompile.errors import PcompileError
from pcompile.plan import Strategy
from pcompile.search.baselines import baselines, no_fit_error
from pcompile.search.costtable import CostTable
from pcompile.search.dp import SettingPlan, SettingSolver
from pcompile.search.index import TableIndex, median
from pcompile.search.result import SearchResult, StagePlan, layer_choices
from pcompile.search.space import (
    PlanCost,
    SearchRules,
    SearchSpace,
    Setting,
    evaluate,
    settings,
    strategies_for,
)

_SPREAD = np.geomspace(1e-4, 1e4, 48)  # the cheap bound's multipliers around the exchange rate
# one tuple per stage shape across settings and engine runs: Strategy objects are built once,
# and the callback's table keys and the check below compare them by identity
_strategies = functools.lru_cache(maxsize=1024)(strategies_for)


@dataclass(frozen=True)
class StageQuery:
    """What the cost callback is asked for: the CostTable of stage `stage` of `pp` (ranks
    first_rank .. first_rank + devices_per_stage - 1) at this micro-batch size, for these strategies."""

    pp: int
    stage: int
    first_rank: int
    devices_per_stage: int
    microbatch_size: int  # samples per micro-batch (the whole stage's; a layer's dp ranks split it)
    strategies: tuple[Strategy, ...]
    microbatches: int = 1  # per step: gradients accumulate over them when > 1


@dataclass(frozen=True)
class SearchProblem:
    layers: tuple[str, ...]  # "pre", blocks..., "post" (the DP treats every entry as a layer)
    num_devices: int
    devices_per_node: int
    global_batch: int
    cost: Callable[[StageQuery], CostTable] = field(compare=False)  # cache it: it is asked per stage
    device_memory: tuple[float, ...]  # memory budget of each rank (bytes); a stage gets its smallest
    p2p_bandwidth: float = 25e9  # bytes/s between consecutive stages
    p2p_latency: float = 1e-5
    space: SearchSpace = SearchSpace()
    rules: SearchRules = SearchRules()
    grid_cells: int = 1000  # memory grid: a stage's budget / grid_cells per cell
    refinements: int = 1  # times the grid step is halved while optimality is not proven

    def __post_init__(self):
        if len(self.device_memory) != self.num_devices:
            raise PcompileError(f"device_memory lists {len(self.device_memory)} ranks for {self.num_devices} devices",
                                "give one memory budget per rank")

    def budgets(self, pp: int) -> list[float]:
        d = self.num_devices // pp
        return [float(min(self.device_memory[k * d:(k + 1) * d])) for k in range(pp)]


class SearchContext:
    """Settings, their cost tables (asked once) and DP solvers (memoised across calls)."""

    def __init__(self, problem: SearchProblem):
        self.problem = problem
        p = problem
        self.settings = settings(p.num_devices, p.devices_per_node, p.global_batch, p.layers, p.space, p.rules)
        self._tables: dict[tuple[int, int], list[CostTable] | None] = {}
        self._indexes: dict[int, TableIndex] = {}
        self._times: dict[int, np.ndarray] = {}
        self._solvers: dict = {}
        self._rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._ordered: list[tuple[float, Setting]] | None = None

    def tables(self, setting: Setting) -> list[CostTable] | None:
        p = self.problem
        key = (setting.pp, setting.microbatches)
        if key not in self._tables:
            d, mb = p.num_devices // setting.pp, p.global_batch // setting.microbatches
            strategies = _strategies(d, p.devices_per_node, mb, p.space, p.rules)
            tables = None
            if strategies:
                tables = [p.cost(StageQuery(setting.pp, k, k * d, d, mb, strategies, setting.microbatches))
                          for k in range(setting.pp)]
                for t in tables:
                    if t.strategies != strategies or t.layers != p.layers:
                        raise PcompileError("the cost callback returned a table for other layers or strategies "
                                            "than it was asked for", "build the table from query.strategies "
                                                                     "and the problem's layers, in that order")
            self._tables[key] = tables
        return self._tables[key]

    def index(self, table: CostTable) -> TableIndex:
        if id(table) not in self._indexes:
            self._indexes[id(table)] = TableIndex(table)
        return self._indexes[id(table)]

    def solver(self, setting: Setting, cells: int, ceil: bool) -> SettingSolver:
        tables = self.tables(setting)
        return SettingSolver(setting, [self.index(t) for t in tables], self.problem.budgets(setting.pp), cells, ceil,
                             self.problem.p2p_bandwidth, self.problem.p2p_latency, self._solvers)

    def lower_bound(self, setting: Setting) -> float:
        """A cheap lower bound of the setting's optimum (switches and temps dropped):
        max_k value_k >= (1/pp) sum_k value_k, and the sum is at least the cheapest
        sum_l (c t + sync)[l, s_l] whose weights (state + r_min act) fit the budgets' total -
        bounded by Lagrangian duality, for every lambda >= 0: sum_l min_s (cost + lambda w) -
        lambda B - plus one p2p send per chunk boundary (pp v - 1 of them, the cheapest each);
        and at least the costliest layer's cheapest strategy that fits a stage alone. Stages
        sharing a table (and in-flight count and budget) are taken once: minima over copies."""
        tables = self.tables(setting)
        if tables is None:
            return math.inf
        c, budgets, pp = setting.coefficient, self.problem.budgets(setting.pp), setting.pp
        flights = [setting.in_flight(k) for k in range(pp)]
        distinct = {id(t): t for t in tables}
        rows, first = self._distinct_rows(setting, distinct)  # identical layers (blocks) priced once
        priced = {}
        for key, t in distinct.items():
            time = self._time(t)[first]
            priced[key] = np.where(np.isfinite(time), c * time + t.sync_time[first], np.inf)
        alone = []
        for key, flight, budget in dict.fromkeys((id(t), flights[k], budgets[k]) for k, t in enumerate(tables)):
            t = distinct[key]
            fits = t.state_memory[first] + flight * t.activation_memory[first] + t.temp_memory[first] <= budget
            alone.append(np.where(fits, priced[key], np.inf).min(axis=1))
        single = float(np.min(alone, axis=0).max())
        cost = np.min(list(priced.values()), axis=0)
        weight = np.min([t.state_memory[first] + min(flights) * t.activation_memory[first]
                         for t in distinct.values()], axis=0)
        if not np.isfinite(single):
            return math.inf
        finite = np.isfinite(cost)
        every = finite[rows]  # the medians are of every layer's entries
        scale = median(cost[rows][every]) / max(median(weight[rows][every]), 1e-30)
        lams = np.concatenate(([0.0], scale * _SPREAD))
        # every multiplier at once: [lambda, layer] minima (per distinct row, then laid out per
        # layer) summed per lambda (each row summed as the 1-D sum of one multiplier's minima is)
        priced = np.where(finite[None], cost[None] + lams[:, None, None] * weight[None], np.inf)
        dual = (priced.min(axis=2)[:, rows].sum(axis=1) - lams * sum(budgets)).max()
        p = self.problem
        sends = min((float(np.min(2 * (p.p2p_latency + t.boundary_bytes / t.send_split / p.p2p_bandwidth)))
                     for t in distinct.values() if t.num_layers > 1), default=0.0)
        return max(single, float(dual + (pp * setting.chunks - 1) * c * sends) / pp)

    def _distinct_rows(self, setting: Setting, distinct: dict) -> tuple[np.ndarray, np.ndarray]:
        """(rows, first): layer l's row is the same in every table as layer first[rows[l]]'s
        (byte for byte), per (pp, micro-batch count): the tables' key."""
        key = (setting.pp, setting.microbatches)
        got = self._rows.get(key)
        if got is None:
            columns = np.concatenate([np.stack([self._time(t), t.sync_time, t.state_memory, t.activation_memory,
                                                t.temp_memory], axis=1).reshape(t.num_layers, -1)
                                      for t in distinct.values()], axis=1)
            ids: dict[bytes, int] = {}
            rows = np.array([ids.setdefault(row.tobytes(), len(ids)) for row in columns])
            first = np.flatnonzero(np.r_[True, rows[1:] > np.maximum.accumulate(rows)[:-1]])
            got = self._rows[key] = (rows, first)
        return got

    def _time(self, table: CostTable) -> np.ndarray:
        """fwd + bwd, inf where not finite (TableIndex.time, without indexing the table)."""
        if id(table) in self._indexes:
            return self._indexes[id(table)].time
        if id(table) not in self._times:
            total = table.fwd_time + table.bwd_time
            self._times[id(table)] = np.where(np.isfinite(total), total, np.inf)
        return self._times[id(table)]

    def ordered(self) -> list[tuple[float, Setting]]:
        if self._ordered is None:
            self._ordered = sorted(((self.lower_bound(s), s) for s in self.settings), key=lambda x: x[0])
        return self._ordered

    def cost_of(self, plan: SettingPlan) -> PlanCost:
        p = self.problem
        return evaluate(plan.setting, self.tables(plan.setting), p.budgets(plan.setting.pp), plan.segments,
                        list(plan.choice), p.p2p_bandwidth, p.p2p_latency)


def best_plan(ctx: SearchContext, cells: int, ceil: bool, incumbent: float = math.inf,
              settings_filter=None) -> tuple[SettingPlan | None, int]:
    """Best-first branch and bound over settings: (the best plan strictly below `incumbent`,
    or None; settings solved exactly). Settings come in order of the cheap bound
    (lower_bound); each gets an upper bound (even_upper, a real plan's value, so settings
    above it are cut) and the DP's bound from unrestricted states, and is solved exactly
    only while that bound can still beat both."""
    best, solved, queue, upper = None, 0, [], math.inf

    def solve_until(limit: float):
        nonlocal best, incumbent, solved
        while queue and queue[0][0] <= min(limit, upper) and queue[0][0] < incumbent:
            _, _, solver = heapq.heappop(queue)
            solved += 1
            plan = solver.best(min(incumbent, upper))
            if plan is not None and plan.value < incumbent:
                best, incumbent = plan, plan.value

    for n, (bound, setting) in enumerate(ctx.ordered()):
        if settings_filter is not None and not settings_filter(setting):
            continue
        solve_until(bound)
        if bound >= incumbent or bound > upper or bound == math.inf:
            break
        solver = ctx.solver(setting, cells, ceil)
        upper = min(upper, solver.even_upper(incumbent))  # an upper >= the incumbent cuts nothing
        relaxed = solver.lower_bound(min(incumbent, upper))
        if relaxed < incumbent and relaxed <= upper:
            heapq.heappush(queue, (relaxed, n, solver))
    solve_until(math.inf)
    return best, solved


@dataclass(frozen=True)
class Outcome:
    plan: SettingPlan | None
    cost: PlanCost | None
    certified: bool  # proven optimal (within float tolerance) despite the memory grid
    gap: float  # plan time / lower bound - 1 (0 when certified)
    cells: int
    solved: int


def certified_plan(ctx: SearchContext, settings_filter=None, faster_than: float = math.inf) -> Outcome:
    """Ceil grid (feasible plans), then floor grid (a relaxation) bounded by the ceil plan:
    nothing below it -> certified; its plan fits exactly -> certified; else halve the grid
    step, up to problem.refinements times, and report the remaining gap. Only plans faster
    than `faster_than` are looked for (none found: Outcome.plan is None)."""
    cells, solved, up, low = ctx.problem.grid_cells, 0, None, None
    for _ in range(ctx.problem.refinements + 1):
        found, n = best_plan(ctx, cells, True, up.value if up else faster_than, settings_filter)
        up, solved = found or up, solved + n
        low, n = best_plan(ctx, cells, False, up.value * (1 - 1e-9) if up else faster_than, settings_filter)
        solved += n
        if low is None:
            return Outcome(up, ctx.cost_of(up) if up else None, True, 0.0, cells, solved)
        if ctx.cost_of(low).fits:
            return Outcome(low, ctx.cost_of(low), True, 0.0, cells, solved)
        cells *= 2
    cost = ctx.cost_of(up) if up else None
    return Outcome(up, cost, False, (up.value / low.value - 1) if up else math.inf, cells // 2, solved)


def search(problem: SearchProblem, faster_than: float = math.inf,
           context: SearchContext | None = None) -> SearchResult | None:
    """The fastest plan of the problem's space that fits every stage's memory, with baselines
    and an explanation. Raises PcompileError (with the leanest plan) when nothing fits.
    With a finite `faster_than` (the step time of a plan the caller holds, baselines included):
    only a faster plan, without baselines, or None. `context`: the problem's SearchContext when
    the caller made it already (its tables and bounds are kept)."""
    start = time.perf_counter()
    ctx = context or SearchContext(problem)
    out = certified_plan(ctx, faster_than=faster_than)
    plan, cost = out.plan, out.cost
    if plan is None:
        if math.isfinite(faster_than):
            return None
        raise no_fit_error(ctx)
    tables = ctx.tables(plan.setting)
    layers, binding = layer_choices(plan.setting, tables, plan.segments, plan.choice, cost)
    d = problem.num_devices // plan.setting.pp
    stages = tuple(StagePlan(k, tuple(problem.layers[l] for a, b in segs for l in range(a, b)), segs, k * d, d,
                             cost.in_flight[k], cost.stage_time[k], cost.stage_sync[k], cost.stage_memory[k],
                             cost.budgets[k]) for k, segs in enumerate(plan.segments))
    found = baselines(ctx) if math.isinf(faster_than) else ()
    return SearchResult(plan.setting, problem.global_batch // plan.setting.microbatches, cost.step_time, stages,
                        layers, found, binding, out.certified, out.gap, out.cells, out.solved, len(ctx.settings),
                        time.perf_counter() - start, cost)
