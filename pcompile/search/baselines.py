"""Baselines priced by the same cost tables and objective as the search, and the leanest plan
(for the error when nothing fits).

  dp             pp = 1, every layer plain data parallel over all devices (tp 1, no ZeRO)
  zero3          pp = 1, every layer ZeRO-3 (sdp) over all devices
  megatron       pp = 1, tp = the largest allowed degree inside a node, dp across (Megatron-LM)
  uniform_3d     the best single strategy for every layer, any (pp, m, schedule), even stages
  pipeline_even  per-layer strategies searched, but stages split evenly (Galvatron's public code)
Each takes its best micro-batch count and checkpointing on/off (uniform over layers).
"""
from __future__ import annotations

import math

import numpy as np

from pcompile.errors import PcompileError
from pcompile.search.result import Baseline, size_text
from pcompile.search.space import Setting, even_segments, p2p_time

DESCRIPTIONS = {
    "dp": "pure data parallel on every device",
    "zero3": "pure ZeRO-3 (sharded data parallel) on every device",
    "megatron": "Megatron TP inside a node x DP across",
    "uniform_3d": "best uniform (dp, tp, pp) strategy, even stages",
    "pipeline_even": "per-layer search on evenly split stages (Galvatron)",
}


def uniform_costs(setting: Setting, tables, budgets, segments, p2p_bandwidth: float, p2p_latency: float):
    """(step time [S], peak memory [pp, S]) of giving every layer strategy s, for every s."""
    c = setting.coefficient
    steps, mems = [], []
    last = tables[0].num_layers - 1
    for k, segs in enumerate(segments):
        tab, r = tables[k], setting.in_flight(k)
        t = np.zeros(tab.num_strategies)
        sync, state, act, temp = (np.zeros(tab.num_strategies) for _ in range(4))
        for a, b in segs:
            rows = slice(a, b)
            t = t + (tab.fwd_time[rows] + tab.bwd_time[rows]).sum(axis=0)
            t = t + np.diagonal(tab.switch_time[a:b - 1], axis1=1, axis2=2).sum(axis=0)
            if b - 1 < last:
                t = t + p2p_time(tab, b - 1, p2p_bandwidth, p2p_latency)
            sync = sync + tab.sync_time[rows].sum(axis=0)
            state = state + tab.state_memory[rows].sum(axis=0)
            act = act + tab.activation_memory[rows].sum(axis=0)
            temp = np.maximum(temp, tab.temp_memory[rows].max(axis=0))
        steps.append(c * t + sync)
        mems.append(state + r * act + temp)
    return np.max(steps, axis=0), np.array(mems)


def _uniform_families(ctx, families: dict) -> list[Baseline]:
    """Per family (name -> keep(setting, strategy, tp degrees)): its best fitting uniform plan
    over all settings, or its leanest peak when none fits."""
    p = ctx.problem
    best = {name: (math.inf, math.inf, "", None) for name in families}
    leanest = {name: math.inf for name in families}
    for setting in ctx.settings:
        tables = ctx.tables(setting)
        segments = even_segments(p.layers, setting.pp, setting.chunks)
        if tables is None or segments is None:
            continue
        budgets = p.budgets(setting.pp)
        step, mem = uniform_costs(setting, tables, budgets, segments, p.p2p_bandwidth, p.p2p_latency)
        peak = mem.max(axis=0)
        fits = np.isfinite(step) & np.all(mem <= np.array(budgets)[:, None], axis=0)
        tps = [s.tp for s in tables[0].strategies]
        for name, keep in families.items():
            mask = np.array([keep(setting, s, tps) for s in tables[0].strategies]) & np.isfinite(step)
            if mask.any():
                leanest[name] = min(leanest[name], float(peak[mask].min()))
            ok = mask & fits
            if ok.any():
                j = int(np.flatnonzero(ok)[np.argmin(step[ok])])
                if step[j] < best[name][0]:
                    best[name] = (float(step[j]), float(peak[j]), setting.describe(), tables[0].strategies[j])
    return [Baseline(name, DESCRIPTIONS[name], *best[name]) if best[name][0] < math.inf
            else Baseline(name, DESCRIPTIONS[name], math.inf, leanest[name]) for name in families]


def _pipeline_even(ctx, below: float = math.inf) -> Baseline:
    """Branch and bound over settings with pp > 1: exact DP only where the even split's bound
    from unrestricted DP states can beat the best so far - or `below`, a step time the caller
    holds already (another run's pipeline_even: only a faster one is looked for, inf if none)."""
    p = ctx.problem
    best, limit = None, below
    for bound, setting in ctx.ordered():
        if setting.pp == 1 or bound == math.inf or bound >= limit:
            continue
        segments = even_segments(p.layers, setting.pp, setting.chunks)
        if segments is None:
            continue
        solver = ctx.solver(setting, p.grid_cells, ceil=True)
        if limit < math.inf and solver.fixed_lower(segments, limit) >= limit:
            continue
        plan = solver.fixed(segments)
        if plan is None:
            continue
        cost = ctx.cost_of(plan)
        if cost.fits and cost.step_time < limit:
            best, limit = (cost.step_time, max(cost.stage_memory), setting.describe()), cost.step_time
    if best is None:
        return Baseline("pipeline_even", DESCRIPTIONS["pipeline_even"], math.inf, math.inf)
    return Baseline("pipeline_even", DESCRIPTIONS["pipeline_even"], *best)


def baselines(ctx, pipeline_even_below: float = math.inf) -> tuple[Baseline, ...]:
    """Every family's baseline; `pipeline_even_below`: as _pipeline_even's `below`."""
    dpn = ctx.problem.devices_per_node
    families = {
        "dp": lambda st, s, tps: st.pp == 1 and s.tp == 1 and not s.sdp and not s.zero2 and s.split == 1,
        "zero3": lambda st, s, tps: st.pp == 1 and s.tp == 1 and s.sdp and s.split == 1,
        "megatron": lambda st, s, tps: (st.pp == 1 and not s.sdp and not s.zero2 and s.split == 1
                                        and s.tp == max([t for t in tps if t <= dpn], default=0)),
        "uniform_3d": lambda st, s, tps: True,
    }
    return tuple(_uniform_families(ctx, families)) + (_pipeline_even(ctx, pipeline_even_below),)


# -- the leanest plan ----------------------------------------------------------------------------
def _stage_memory(table, in_flight: float) -> np.ndarray:
    """[i, j]: least peak memory of a stage holding layers i..j-1: min over the transient cap
    theta of theta + sum_l min over strategies with temp <= theta of state + r act."""
    valid = np.isfinite(table.fwd_time + table.bwd_time) & np.isfinite(table.sync_time)
    w = np.where(valid, table.state_memory + in_flight * table.activation_memory, np.inf)
    L = table.num_layers
    best = np.full((L + 1, L + 1), np.inf)
    for theta in np.unique(table.temp_memory[valid]):
        per_layer = np.where(table.temp_memory <= theta, w, np.inf).min(axis=1)
        finite = np.isfinite(per_layer)
        sums = np.r_[0.0, np.cumsum(np.where(finite, per_layer, 0.0))]
        bad = np.r_[0, np.cumsum(~finite)]
        mem = theta + sums[None, :] - sums[:, None]
        mem[(bad[None, :] - bad[:, None]) > 0] = np.inf
        best = np.minimum(best, mem)
    return best


def leanest_plan(ctx) -> tuple[float, Setting | None, tuple[int, ...]]:
    """(least max-over-stages peak memory of any plan, its setting, its stage boundaries)."""
    p = ctx.problem
    L = len(p.layers)
    best = (math.inf, None, ())
    for setting in ctx.settings:
        tables = ctx.tables(setting)
        if tables is None:
            continue
        mems = [_stage_memory(t, setting.in_flight(k)) for k, t in enumerate(tables)]
        if setting.chunks > 1:
            segs = even_segments(p.layers, setting.pp, setting.chunks)
            peak = max(sum(mems[k][a, b] for a, b in s) for k, s in enumerate(segs))  # upper bound: one cap per chunk
            if peak < best[0]:
                best = (float(peak), setting, tuple(a for s in segs for a, _ in s))
            continue
        F, back = np.full(L + 1, np.inf), []
        F[0] = 0.0
        for k in range(setting.pp):
            cand = np.maximum(F[:, None], mems[k])
            cand[np.tril_indices(L + 1)] = np.inf
            back.append(np.argmin(cand, axis=0))
            F = cand.min(axis=0)
        if F[L] < best[0]:
            bounds = [L]
            for arg in reversed(back):
                bounds.append(int(arg[bounds[-1]]))
            best = (float(F[L]), setting, tuple(bounds[::-1][:-1]))
    return best


class NoFit(PcompileError):
    """Nothing fits: the error, with the baselines (each family's leanest peak) for the caller's
    comparison table, and `need`: the leanest plan's peak per device (bytes)."""

    def __init__(self, cause: str, fix: str, found: tuple[Baseline, ...], need: float = math.inf):
        super().__init__(cause, fix)
        self.baselines, self.need = found, need


def no_fit_error(ctx) -> PcompileError:
    need, setting, starts = leanest_plan(ctx)
    budgets = sorted(set(ctx.problem.device_memory))
    have = size_text(budgets[0]) + (f" to {size_text(budgets[-1])}" if len(budgets) > 1 else "")
    if setting is None:
        return PcompileError("no plan is valid: no strategy divides the micro-batches over the devices, or every "
                             "(layer, strategy) pair is marked impossible",
                             "use a global batch divisible by the data-parallel degrees, or widen the space")
    return NoFit(
        f"no plan fits the devices' memory ({have}): the leanest plan ({setting.describe()}, stages starting at "
        f"layers {list(starts)}) needs {size_text(need)} per device",
        f"give every device at least {size_text(need)}, add devices, lower the global batch, or allow "
        "checkpointing / ZeRO-3 in the search space", baselines(ctx), need)
