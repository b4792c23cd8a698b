"""The plan search: per-stage knapsack DPs under a min-max stage partition, over every setting.

Per stage (a layer sequence, its CostTable, in-flight count r, bottleneck factor c, budget M):
Galvatron's multiple-choice knapsack with switching cost, memory on a grid of `cells` steps
of M / cells:
    f[l][v][s] = c t[l,s] + sync[l,s] + min_s' (f[l-1][v - w[l,s]][s'] + c switch[l-1,s',s])
    w[l,s] = state + r act (in cells); a stage's value = min_s f[last][cells(M - theta)][s]
The peak adds max_l temp[l, s_l], which is not a sum: for each threshold theta (a distinct
temp value) the layers may only use strategies with temp <= theta and the budget is M - theta;
the stage's value is the minimum over theta, searched best-first with the bound
max(unrestricted_f[cells(M - theta)], max_lambda sum_l min_{s: temp <= theta} (cost + lambda w)
- lambda cells(M - theta)) (more strategies never hurt, less memory never helps; the second is
the Lagrangian dual of the restricted knapsack, which prunes the thresholds whose cheap
strategies do not fit).
`min_s'` is taken per class of identical switch rows (strategies with the same activation
layout), V x C x S instead of V x S x S. States are memoised by the signature of the layer
sequence, so identical blocks share them (a 96-block model has ~100 distinct stage prefixes).

Stages: F[k][j] = min_i max(F[k-1][i], g_k(i, j)) over contiguous partitions (g monotone in
j and in -i, which prunes the scan at the incumbent); interleaved 1F1B uses the even chunks.
Settings are visited in order of a lower bound (c * sum of per-layer minimum times / pp) and
cut at the incumbent.

Grid exactness: rounding weights down makes a relaxation (every true plan stays feasible),
rounding up a restriction (every plan found fits). The floor search's plan, checked exactly,
is optimal when it fits; otherwise the ceil search's plan is optimal when its time equals the
floor bound; otherwise the grid is halved (`SearchResult.certified` says which happened).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pcompile.errors import PcompileError
from pcompile.search.costtable import CostTable
from pcompile.search.space import Setting, even_segments, p2p_time

FIRST, SEAM = -2, -1  # incoming edge of a stage's first layer / of a chunk's first layer (no switch)
_SPREAD = np.geomspace(1e-3, 1e3, 31)  # the multipliers' range around the exchange rate (StageSolver.lams)


def _unique(values: np.ndarray) -> np.ndarray:
    """np.unique of a 1-D float array without NaN (sorted, each value once), without the
    numpy.ma import np.unique makes on its first plain call (0.1 s of a first plan)."""
    ordered = np.sort(values, axis=None)
    if len(ordered) < 2:
        return ordered
    first = np.empty(len(ordered), dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def median(values: np.ndarray) -> float:
    """np.median of a non-empty 1-D array without NaN (the middle value, or the mean of the two
    middle ones: the same float), without its dispatch overhead."""
    ordered = np.sort(values, axis=None)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@dataclass(frozen=True)
class _Key:
    parent: int
    layer: int
    incoming: int  # boundary index (switch between layer-1 and layer), FIRST or SEAM
    thetas: np.ndarray  # distinct temp values of the valid strategies of the sequence's layers
    max_temp: float  # the largest of them (-inf: none)


class _State(NamedTuple):
    """A DP state f[s, v] stored by the strategies that can hold a plan: f[i] is strategy
    rows[i]'s row (rows ascending); every other strategy's row is inf. `live`: the positions
    i whose row holds a plan somewhere (a state is non-increasing in the cells: its last cell
    is finite)."""

    rows: np.ndarray  # strategy indices, ascending
    f: np.ndarray  # [len(rows), cells]
    live: list[int]

    def best(self) -> np.ndarray:
        """min over strategies, per cell."""
        return self.f.min(axis=0) if len(self.rows) else np.full(self.f.shape[1], np.inf)

    def argmin(self, values: np.ndarray) -> int:
        """The strategy of the first smallest of `values` (one per row): the full [strategy]
        array's argmin when its minimum is finite."""
        return int(self.rows[int(np.argmin(values))])


def _key(parent: int, layer: int, incoming: int, thetas: np.ndarray) -> _Key:
    return _Key(parent, layer, incoming, thetas, float(thetas[-1]) if len(thetas) else -math.inf)


class TableIndex:
    """A CostTable prepared for the DP: time/sync/memory rows, row and switch signatures,
    switch matrices compressed to classes of identical source rows, interned sequence keys."""

    def __init__(self, table: CostTable):
        _check_table(table)
        self.table = table
        self.time = np.where(np.isfinite(table.fwd_time + table.bwd_time), table.fwd_time + table.bwd_time, np.inf)
        valid = np.isfinite(self.time) & np.isfinite(table.sync_time)
        rows = np.stack([self.time, table.sync_time, table.state_memory, table.activation_memory,
                         table.temp_memory], axis=1)
        self.row_sig = _signatures([rows[l].tobytes() for l in range(table.num_layers)])
        # identical rows (repeated blocks) have identical temps: one unique per distinct row
        first = {sig: l for l, sig in reversed(list(enumerate(self.row_sig)))}
        distinct = {sig: _unique(table.temp_memory[l, valid[l]]) for sig, l in first.items()}
        self.temps = [distinct[sig] for sig in self.row_sig]
        self.switch_sig = _signatures([table.switch_time[b].tobytes() for b in range(table.num_layers - 1)])
        self.switch_classes: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.keys: dict[tuple[int, int, int], int] = {}
        self._sequences: dict[tuple, int] = {}  # segments -> key (sequence's memo)
        self.info: list[_Key] = [_key(-1, -1, FIRST, np.empty(0))]

    def child(self, parent: int, layer: int, incoming: int) -> int:
        """The key of sequence `parent` + `layer` (entered through `incoming`)."""
        edge = self.switch_sig[incoming] if incoming >= 0 else incoming
        sig = (parent, edge, self.row_sig[layer])
        key = self.keys.get(sig)
        if key is None:
            key = len(self.info)
            self.keys[sig] = key
            thetas = _unique(np.concatenate([self.info[parent].thetas, self.temps[layer]]))  # np.union1d
            self.info.append(_key(parent, layer, incoming, thetas))
        return key

    def sequence(self, segments) -> int:
        segments = tuple(tuple(s) for s in segments)
        key = self._sequences.get(segments)
        if key is None:
            key = 0
            for a, b in segments:
                for layer in range(a, b):
                    key = self.child(key, layer, FIRST if key == 0 else (SEAM if layer == a else layer - 1))
            self._sequences[segments] = key
        return key

    def compressed_switch(self, boundary: int):
        """(labels, rows, targets): strategies grouped by identical switch rows (source classes:
        `labels[s]`) and by identical columns (target classes: `targets[s]`); rows[c, t] is the
        switch time from source class c to target class t.
        min over s' of f[s'] + sw[s', s] = min over c of (min over s' in c of f[s']) + rows[c, t(s)]."""
        sig = self.switch_sig[boundary]
        if sig not in self.switch_classes:
            rows, labels = np.unique(self.table.switch_time[boundary], axis=0, return_inverse=True)
            cols, targets = np.unique(rows, axis=1, return_inverse=True)
            self.switch_classes[sig] = (labels.reshape(-1).tolist(), cols, targets.reshape(-1).tolist())
        return self.switch_classes[sig]


def _signatures(blobs: list[bytes]) -> list[int]:
    ids: dict[bytes, int] = {}
    return [ids.setdefault(b, len(ids)) for b in blobs]


def _check_table(t: CostTable) -> None:
    L, S = t.num_layers, t.num_strategies
    shapes = {"fwd_time": (L, S), "bwd_time": (L, S), "sync_time": (L, S), "state_memory": (L, S),
              "activation_memory": (L, S), "temp_memory": (L, S), "switch_time": (max(L - 1, 0), S, S),
              "boundary_bytes": (max(L - 1, 0),)}
    for name, shape in shapes.items():
        got = np.shape(getattr(t, name))
        if got != shape:
            raise PcompileError(f"CostTable.{name} has shape {got}, expected {shape} ({L} layers x {S} strategies)",
                                "fill every array for every (layer, strategy) of the table")
    for name in ("state_memory", "activation_memory", "temp_memory", "switch_time", "boundary_bytes"):
        arr = np.asarray(getattr(t, name))
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise PcompileError(f"CostTable.{name} has negative or non-finite entries",
                                "memory, switch times and boundary bytes must be finite and >= 0 "
                                "(mark impossible strategies with time = inf instead)")


class StageSolver:
    """The knapsack DP of one stage kind: (table, in-flight r, factor c, budget M, rounding)."""

    def __init__(self, index: TableIndex, in_flight: float, coefficient: float, budget: float, cells: int,
                 ceil: bool):
        self.index, self.c, self.budget = index, coefficient, budget
        table = index.table
        self.step = budget / cells if budget > 0 else 1.0
        self.V = cells + 1
        weight = (table.state_memory + in_flight * table.activation_memory) / self.step
        self.ceil = ceil
        cells_used = np.ceil(weight * (1 + 1e-12)) if ceil else np.floor(weight)
        self.w = np.minimum(cells_used, self.V).astype(np.int64)
        sync = np.where(np.isfinite(table.sync_time), table.sync_time, np.inf)
        self.cost = coefficient * index.time + sync
        self.states: dict[tuple[int, float], np.ndarray] = {}
        self.values: dict[int, tuple[float, float]] = {}
        self._dual: dict[int, np.ndarray] = {}
        self._own_dual: dict[tuple, np.ndarray] = {}
        self._lams: np.ndarray | None = None
        self._bounds_memo: dict[int, tuple] = {}
        self._upper: dict[int, tuple] = {}
        self._layers: dict[tuple, tuple] = {}

    @property
    def lams(self) -> np.ndarray:
        """Lagrange multipliers of the memory constraint for the per-theta bounds (dual): 0 (memory
        ignored) and a geometric range around the exchange rate of time per cell of memory."""
        if self._lams is None:
            finite = np.isfinite(self.cost) & (self.w > 0)
            rate = float(median(self.cost[finite]) / median(self.w[finite])) if finite.any() else 1.0
            self._lams = np.r_[0.0, rate * _SPREAD]
        return self._lams

    def cells(self, theta: float) -> int:
        """Budget cells left once the transient theta is reserved (-1: nothing fits)."""
        if theta > self.budget:
            return -1
        reserved = theta / self.step
        reserved = math.ceil(reserved * (1 + 1e-12)) if self.ceil else math.floor(reserved)
        return self.V - 1 - reserved if reserved < self.V else -1

    def _cells_of(self, thetas: np.ndarray) -> np.ndarray:
        """cells() of every theta at once."""
        reserved = thetas / self.step
        reserved = np.ceil(reserved * (1 + 1e-12)) if self.ceil else np.floor(reserved)
        return np.where((thetas > self.budget) | (reserved >= self.V), -1, self.V - 1 - reserved).astype(np.int64)

    def _norm(self, key: int, theta: float) -> float:
        return math.inf if theta >= self.index.info[key].max_temp else theta

    def state(self, key: int, theta: float) -> _State:
        """f[s, v] of the sequence `key` with strategies restricted to temp <= theta."""
        chain = []
        k = key
        while k and (k, self._norm(k, theta)) not in self.states:
            chain.append(k)
            k = self.index.info[k].parent
        f = self.states[(k, self._norm(k, theta))] if k else None
        for k in reversed(chain):
            f = self._extend(f, k, theta)
            self.states[(k, self._norm(k, theta))] = f
        return f

    def _layer(self, layer: int, theta: float) -> tuple[np.ndarray, list[int], list[int], list[float]]:
        """(strategies, as an array and a list, weight and cost of each) the layer can take with
        temps <= theta: memoised by the layer's row signature (identical blocks share it)."""
        key = (self.index.row_sig[layer], theta)
        got = self._layers.get(key)
        if got is None:
            cost = self.cost[layer]
            if theta < math.inf:
                cost = np.where(self.index.table.temp_memory[layer] <= theta, cost, np.inf)
            w = self.w[layer]
            valid = np.flatnonzero(np.isfinite(cost) & (w < self.V))
            order = valid.tolist()
            got = self._layers[key] = (valid, order, w[valid].tolist(), cost[valid].tolist())
        return got

    def _extend(self, prev: _State | None, key: int, theta: float) -> _State:
        """One layer of the recurrence, for the strategies the layer can take only, from the
        rows of `prev` that hold a plan: f[s, w[s]:] = h[target(s)] + cost[s], inf below w[s],
        h[t] = min over source classes c of (min over c's rows of prev) + c switch[c, t]."""
        info = self.index.info[key]
        V = self.V
        valid, order, ws, costs = self._layer(info.layer, theta)
        if not order or (prev is not None and not prev.live):
            return _State(valid[:0], np.empty((0, V)), [])
        out = np.empty((len(order), V))
        live = []
        if prev is None:
            for i, (a, cost) in enumerate(zip(ws, costs)):
                out[i, :a] = np.inf
                out[i, a:] = cost
            return _State(valid, out, list(range(len(order))))
        if info.incoming == SEAM:
            h, targets = {0: prev.f[prev.live].min(axis=0)}, None
        else:
            labels, rows, targets = self.index.compressed_switch(info.incoming)
            sources = prev.rows
            best: dict[int, np.ndarray] = {}  # source class -> min over its rows that hold a plan
            for i in prev.live:
                c = labels[sources[i]]
                best[c] = prev.f[i] if c not in best else np.minimum(best[c], prev.f[i])
            h = {}
            for t in {targets[s] for s in order}:
                for c, g in best.items():
                    moved = g + self.c * rows[c, t]
                    h[t] = moved if t not in h else np.minimum(h[t], moved, out=h[t])
        for i, s in enumerate(order):
            a = ws[i]
            g = h[0 if targets is None else targets[s]]
            out[i, :a] = np.inf
            np.add(g[:V - a], costs[i], out=out[i, a:])
            if g[V - 1 - a] < math.inf:
                live.append(i)
        return _State(valid, out, live)

    def dual(self, key: int) -> np.ndarray:
        """[theta of the sequence, lambda]: sum over its layers of min over strategies with temp
        <= theta of (cost + lambda w), switches ignored. For every plan with temps <= theta and
        sum w <= v cells: its value >= dual[theta, lambda] - lambda v (Lagrangian duality; lambda = 0
        is the memory-free bound)."""
        got = self._dual.get(key)
        if got is None:
            info = self.index.info[key]
            # the layer's own term depends on its row and the thresholds only: identical blocks share it
            own = (self.index.row_sig[info.layer], info.thetas.tobytes())
            got = self._own_dual.get(own)
            if got is None:
                temp = self.index.table.temp_memory[info.layer]
                order = np.argsort(temp, kind="stable")
                at = np.searchsorted(temp[order], info.thetas, side="right") - 1
                priced = (self.cost[info.layer][order][None, :]
                          + self.lams[:, None] * self.w[info.layer][order][None, :])
                cheapest = np.minimum.accumulate(priced, axis=1)
                got = self._own_dual[own] = np.where(at[:, None] >= 0, cheapest[:, np.maximum(at, 0)].T, np.inf)
            if info.parent:
                parent = self.index.info[info.parent].thetas
                at = np.searchsorted(parent, info.thetas, side="right") - 1
                got = got + np.where(at[:, None] >= 0, self.dual(info.parent)[np.maximum(at, 0)], np.inf)
            self._dual[key] = got
        return got

    def _free(self, key: int) -> tuple[np.ndarray, int, float]:
        """(the unrestricted DP's best value per cell, the cells left at M - max temp, the
        value there: a plan, the `upper` bound), memoised."""
        got = self._upper.get(key)
        if got is None:
            thetas = self.index.info[key].thetas
            if not len(thetas):
                got = (None, -1, math.inf)
            else:
                free = self.state(key, math.inf).best()
                top = self.cells(float(thetas[-1]))
                got = (free, top, float(free[top]) if top >= 0 else math.inf)
            self._upper[key] = got
        return got

    def _bounds(self, key: int):
        """(upper, lower, sorted (bound, theta)): the unrestricted DP at budget M - max temp is
        a plan (upper); min over theta of max(unrestricted at M - theta, the restricted DP's
        Lagrangian bound `dual`) bounds every plan (lower)."""
        got = self._bounds_memo.get(key)
        if got is None:
            thetas = self.index.info[key].thetas
            free, top, upper = self._free(key)
            bounds = []
            if len(thetas):
                cells = self._cells_of(thetas[:-1])
                keep = np.flatnonzero((cells >= 0) & (cells != top))
                if len(keep):
                    v = cells[keep]
                    relaxed = (self.dual(key)[keep] - self.lams[None, :] * v[:, None]).max(axis=1)
                    bound = np.maximum(free[v], relaxed)
                    # thresholds that reserve the same cells: only the largest (most strategies) counts
                    group = {int(c): (float(b), float(t)) for c, b, t in zip(v, bound, thetas[keep])}
                    bounds = sorted(group.values())
            lower = min(upper, bounds[0][0]) if bounds else upper
            got = self._bounds_memo[key] = (upper, lower, bounds)
        return got

    def upper(self, key: int) -> float:
        return self._free(key)[2]

    def lower(self, key: int) -> float:
        return self._bounds(key)[1]

    def value(self, key: int) -> tuple[float, tuple[float, float]]:
        """(min over plans of c T + S for the sequence within budget, (theta reserved, theta
        restricting temps) of the DP state that achieves it)."""
        got = self.values.get(key)
        if got is not None:
            return got
        thetas = self.index.info[key].thetas
        best, _, bounds = self._bounds(key)
        arg = (float(thetas[-1]) if len(thetas) else math.inf, math.inf)
        for bound, theta in bounds:
            if bound >= best:
                break
            # the unrestricted optimum at this budget may already keep its temps <= theta
            if self.cells(self._max_temp(key, self.trace(key, theta, math.inf))) >= self.cells(theta):
                best, arg = bound, (theta, math.inf)
                continue
            state = self.state(key, theta)
            val = float(state.f[:, self.cells(theta)].min()) if len(state.rows) else math.inf
            if val < best:
                best, arg = val, (theta, theta)
        self.values[key] = (best, arg)
        return best, arg

    def _max_temp(self, key: int, choice: list[int]) -> float:
        layers = []
        while key:
            layers.append(self.index.info[key].layer)
            key = self.index.info[key].parent
        return max(self.index.table.temp_memory[l, s] for l, s in zip(layers[::-1], choice))

    def strategies(self, key: int) -> list[int]:
        """The optimal strategy index per layer of the sequence."""
        reserve, restrict = self.value(key)[1]
        return self.trace(key, reserve, restrict)

    def trace(self, key: int, reserve: float, restrict: float) -> list[int]:
        """Backtrack the memo: the best plan with budget M - reserve and temps <= restrict."""
        info = self.index.info
        v = self.cells(reserve)
        state = self.state(key, restrict)
        s = state.argmin(state.f[:, v])
        out, k = [s], key
        while info[k].parent:
            v -= int(self.w[info[k].layer, s])
            prev = self.state(info[k].parent, restrict)
            if info[k].incoming == SEAM:
                s = prev.argmin(prev.f[:, v])
            else:
                s = prev.argmin(prev.f[:, v] + self.c * self.index.table.switch_time[info[k].incoming][prev.rows, s])
            out.append(s)
            k = info[k].parent
        return out[::-1]


@dataclass(frozen=True)
class SettingPlan:
    setting: Setting
    value: float  # the objective as the DP computed it
    segments: tuple[tuple[tuple[int, int], ...], ...]  # per stage, its layer ranges
    choice: tuple[int, ...]  # strategy index per layer


class SettingSolver:
    """All stages of one setting: their tables, budgets and DP solvers."""

    def __init__(self, setting: Setting, indexes: list[TableIndex], budgets: list[float], cells: int, ceil: bool,
                 p2p_bandwidth: float, p2p_latency: float, solver_cache: dict):
        self.setting, self.indexes = setting, indexes
        c = setting.coefficient
        self.solvers = []
        for k, (index, budget) in enumerate(zip(indexes, budgets)):
            r = setting.in_flight(k)
            cache_key = (id(index), r, c, budget, cells, ceil)
            if cache_key not in solver_cache:
                solver_cache[cache_key] = StageSolver(index, r, c, budget, cells, ceil)
            self.solvers.append(solver_cache[cache_key])
        L = indexes[0].table.num_layers
        self.p2p = [np.array([c * p2p_time(ix.table, l, p2p_bandwidth, p2p_latency) for l in range(L - 1)] + [0.0])
                    for ix in indexes]
        self.p2p_list = [p.tolist() for p in self.p2p]

    def fixed(self, segments) -> SettingPlan | None:
        """The best plan with these stage segments (even split, interleaved chunks)."""
        if segments is None:
            return None
        total, keys = 0.0, []
        for k, segs in enumerate(segments):
            key = self.indexes[k].sequence(segs)
            val = self.solvers[k].value(key)[0] + sum(self.p2p[k][b - 1] for _, b in segs)
            total, keys = max(total, val), keys + [key]
        if total == math.inf:
            return None
        return self._plan(total, segments, keys)

    def _plan(self, value, segments, keys) -> SettingPlan:
        choice = [0] * self.indexes[0].table.num_layers
        for k, key in enumerate(keys):
            layers = [l for a, b in segments[k] for l in range(a, b)]
            for layer, s in zip(layers, self.solvers[k].strategies(key)):
                choice[layer] = s
        return SettingPlan(self.setting, value, tuple(segments), tuple(choice))

    def fixed_lower(self, segments) -> float:
        """A lower bound of fixed(segments) from unrestricted DP states only."""
        return max(self.solvers[k].lower(self.indexes[k].sequence(segs)) + sum(self.p2p[k][b - 1] for _, b in segs)
                   for k, segs in enumerate(segments))

    def even_upper(self) -> float:
        """The value of a real plan (even stages, each stage's unrestricted DP at budget M minus
        its largest temp) from unrestricted states only: an upper bound of this setting."""
        s = self.setting
        segments = even_segments(self.indexes[0].table.layers, s.pp, s.chunks)
        if segments is None:
            return math.inf
        return max(self.solvers[k].upper(self.indexes[k].sequence(segs)) + sum(self.p2p[k][b - 1] for _, b in segs)
                   for k, segs in enumerate(segments))

    def lower_bound(self, bound: float) -> float:
        """A lower bound of this setting's optimum from unrestricted DP states only (no
        temp-threshold passes); inf when it exceeds `bound`."""
        s = self.setting
        if s.chunks > 1:
            segments = even_segments(self.indexes[0].table.layers, s.pp, s.chunks)
            if segments is None:
                return math.inf
            return max(self.solvers[k].lower(self.indexes[k].sequence(segs)) + sum(self.p2p[k][b - 1] for _, b in segs)
                       for k, segs in enumerate(segments))
        return float(self._partition(bound, exact=False)[0][-1])

    def best(self, bound: float) -> SettingPlan | None:
        """The optimal plan of this setting if its value is <= bound (min-max partition DP)."""
        s = self.setting
        if s.chunks > 1:
            plan = self.fixed(even_segments(self.indexes[0].table.layers, s.pp, s.chunks))
            return plan if plan is not None and plan.value <= bound else None
        bound = min(bound, self.even_upper())
        F, back = self._partition(bound, exact=True)
        L, pp = len(F) - 1, s.pp
        if not F[L] <= bound or F[L] == math.inf:
            return None
        bounds = [L]
        for k in range(pp - 1, -1, -1):
            bounds.append(int(back[k][bounds[-1]]))
        bounds = bounds[::-1]
        segments = tuple(((bounds[k], bounds[k + 1]),) for k in range(pp))
        keys = [self.indexes[k].sequence(segments[k]) for k in range(pp)]
        return self._plan(float(F[L]), segments, keys)

    def _partition(self, bound: float, exact: bool):
        """F[k][j] = min_i max(F[k-1][i], g_k(i, j)) with g exact (or its lower bound), pruned
        at `bound`: g_k(i, j) grows with j and shrinks with i, so scans stop past the bound.
        (Python lists in the scan: its steps are a few comparisons each.)"""
        L, pp = self.indexes[0].table.num_layers, self.setting.pp
        inf = math.inf
        F = [0.0] + [inf] * L
        back = []
        for k in range(pp):
            index, solver, p2p = self.indexes[k], self.solvers[k], self.p2p_list[k]
            lower, child, known, memo = solver.lower, index.child, index.keys, solver._bounds_memo
            rows, edges = index.row_sig, index.switch_sig
            G, arg = [inf] * (L + 1), [-1] * (L + 1)
            last = k == pp - 1
            stop = L - (pp - 1 - k)
            for i in (range(L - 1, k - 1, -1) if last else range(k, stop)):
                f = F[i]
                if f > bound:
                    continue
                key = 0 if not last else index.sequence(((i, L),))
                for j in ((L,) if last else range(i + 1, stop + 1)):
                    if not last:  # index.child(key, j - 1, ...), its memo read inline
                        incoming = FIRST if key == 0 else j - 2
                        found = known.get((key, edges[incoming] if incoming >= 0 else incoming, rows[j - 1]))
                        key = found if found is not None else child(key, j - 1, incoming)
                    got = memo.get(key)
                    low = got[1] if got is not None else lower(key)
                    if low > bound:
                        break
                    send = p2p[j - 1]
                    if max(f, low + send) >= G[j]:
                        continue  # cannot improve G[j]
                    if not exact:
                        val = low
                    elif solver.upper(key) + send <= f:
                        val = solver.upper(key)  # not this partial plan's max: its exact value is moot
                    else:
                        val = solver.value(key)[0]
                        if val > bound:
                            break
                    cand = max(f, val + send)
                    if cand < G[j]:
                        G[j], arg[j] = cand, i
                if last and lower(key) > bound:
                    break  # a longer last stage (smaller i) costs at least as much
            F = G
            back.append(np.array(arg))
        return np.array(F), back
