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
A layer's strategy b is dropped before the DP when a lower-indexed a dominates it (no slower,
no sync and no memory column larger, the same switches: f[a] <= f[b] in every cell, ties go to
a; TableIndex.kept), which changes no value and no argmin. A state keeps h behind V infs (per
target class, 2V floats) and each row's (shift, cost); the S x V rows exist only while a child
takes their class minima, all strategies in one gather from a strided window.

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

from pcompile.search.index import FIRST, SEAM, TableIndex, median, unique
from pcompile.search.space import Setting, even_segments, p2p_time

_SPREAD = np.geomspace(1e-3, 1e3, 31)  # the multipliers' range around the exchange rate (StageSolver.lams)
_ONE = np.zeros(1, dtype=np.int64)  # the one target class of a layer entered without a switch


class _State(NamedTuple):
    """A DP state f[s, v], kept as what its rows read (the last layer's h behind V infs, and per
    strategy its shift and cost: ~T x 2V floats instead of S x V): f[i, v] = padded[t_i,
    shift_i + v] + cost_i for strategy rows[i] (rows ascending), every other strategy's row is
    inf. `live`: some row holds a plan (a state is non-increasing in the cells: its last cell
    is finite)."""

    rows: np.ndarray  # strategy indices, ascending
    padded: np.ndarray  # [target class, 2V]: V infs, then h of the class
    which: np.ndarray | None  # the target class each row reads (None: the one class)
    shift: np.ndarray  # V - w per row: the first of the V cells its row reads
    cost: np.ndarray  # [rows, 1]
    live: bool
    memo: dict  # "best": best(), kept (a child entered through one source class reads it too)

    def f(self, rows: np.ndarray | None = None) -> np.ndarray:
        """[rows, V] (all, or the positions `rows` selects), each row read from a strided window
        of its class's padded row (one gather)."""
        T, width = self.padded.shape
        V = width // 2
        size = self.padded.itemsize
        window = np.ndarray((T, V + 1, V), buffer=self.padded, strides=(width * size, size, size))
        which, shift, cost = self.which, self.shift, self.cost
        if rows is not None:
            which, shift, cost = None if which is None else which[rows], shift[rows], cost[rows]
        out = window[0][shift] if which is None else window[which, shift]
        out += cost
        return out

    def column(self, v: int) -> np.ndarray:
        """f[:, v] (v < 0 counts from the end, as an array index would)."""
        at = self.shift + (v if v >= 0 else v + self.padded.shape[1] // 2)
        return (self.padded[0, at] if self.which is None else self.padded[self.which, at]) + self.cost[:, 0]

    def best(self) -> np.ndarray:
        """min over strategies, per cell."""
        got = self.memo.get("best")
        if got is None:
            got = self.memo["best"] = (self.f().min(axis=0) if len(self.rows)
                                       else np.full(self.padded.shape[1] // 2, np.inf))
        return got

    def argmin(self, values: np.ndarray) -> int:
        """The strategy of the first smallest of `values` (one per row): the full [strategy]
        array's argmin when its minimum is finite."""
        return int(self.rows[int(np.argmin(values))])


class _Layer(NamedTuple):
    """What one layer may take under a temp threshold: its strategies, their cost and their
    weight as a shift V - w; per incoming switch signature the target classes it reads (memo)."""

    valid: np.ndarray
    cost: np.ndarray  # [n, 1]
    shift: np.ndarray
    targets: dict


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
        self._reserved: dict[int, tuple] = {}  # id(thetas) -> what _bounds reads of their cells
        self._upper: dict[int, tuple] = {}
        self._layers: dict[tuple, tuple] = {}

    @property
    def lams(self) -> np.ndarray:
        """Lagrange multipliers of the memory constraint for the per-theta bounds (dual): 0 (memory
        ignored) and a geometric range around the exchange rate of time per cell of memory."""
        if self._lams is None:
            finite = np.isfinite(self.cost) & (self.w > 0)
            rate = float(median(self.cost[finite]) / median(self.w[finite])) if finite.any() else 1.0
            self._lams = np.concatenate(([0.0], rate * _SPREAD))  # (np.r_ costs ~10 us a call)
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

    def _layer(self, layer: int, theta: float) -> _Layer:
        """The strategies the layer can take with temps <= theta (undominated: TableIndex.kept),
        memoised by the layer's place (identical blocks share it)."""
        key = (self.index.place_sig[layer], theta)
        got = self._layers.get(key)
        if got is None:
            cost = self.cost[layer]
            if theta < math.inf:
                cost = np.where(self.index.table.temp_memory[layer] <= theta, cost, np.inf)
            w = self.w[layer]
            valid = np.flatnonzero(np.isfinite(cost) & (w < self.V) & self.index.kept(layer))
            got = self._layers[key] = _Layer(valid, cost[valid][:, None], self.V - w[valid], {})
        return got

    def _extend(self, prev: _State | None, key: int, theta: float) -> _State:
        """One layer of the recurrence, for the strategies the layer can take only, from the
        rows of `prev`: f[s, w[s]:] = h[target(s)] + cost[s], inf below w[s],
        h[t] = min over source classes c of (min over c's rows of prev) + c switch[c, t].
        Stored as h behind V infs (f[s] is that row read from V - w[s] on, plus cost[s]):
        prev's rows exist only while its classes' minima are taken."""
        info = self.index.info[key]
        V = self.V
        layer = self._layer(info.layer, theta)
        if not len(layer.valid) or (prev is not None and not prev.live):
            return _State(layer.valid[:0], np.full((1, 2 * V), np.inf), None, layer.shift[:0], layer.cost[:0], False,
                          {})
        if prev is None or info.incoming == SEAM:  # no switch: one class, h = 0 (first) or min of prev
            targets, which = _ONE, None
        else:
            labels, rows, classes = self.index.compressed_switch(info.incoming)
            edge = self.index.switch_sig[info.incoming]
            if edge not in layer.targets:  # the target classes this layer's strategies read
                used = unique(classes[layer.valid])  # sorted: which[i] indexes it
                layer.targets[edge] = (used, np.searchsorted(used, classes[layer.valid]) if len(used) > 1 else None)
            targets, which = layer.targets[edge]
        padded = np.empty((len(targets), 2 * V))
        padded[:, :V] = np.inf
        h = padded[:, V:]
        if prev is None:
            h[:] = 0.0
        elif targets is _ONE:
            h[0] = prev.best()
        else:
            sources = labels[prev.rows]
            if (sources == sources[0]).all():  # one source class
                np.add(prev.best(), (self.c * rows[sources[0], targets])[:, None], out=h)
            else:  # a few classes (activation layouts): a loop beats a [class, target, V] array
                for n, c in enumerate(unique(sources)):
                    moved = prev.f(sources == c).min(axis=0) + (self.c * rows[c, targets])[:, None]
                    if n:
                        np.minimum(h, moved, out=h)
                    else:
                        h[:] = moved
        last = h[0, layer.shift - 1] if which is None else h[which, layer.shift - 1]  # f[:, V - 1] - cost
        return _State(layer.valid, padded, which, layer.shift, layer.cost, bool((last < math.inf).any()), {})

    def dual(self, key: int) -> np.ndarray:
        """[theta of the sequence, lambda]: sum over its layers of min over strategies with temp
        <= theta of (cost + lambda w), switches ignored. For every plan with temps <= theta and
        sum w <= v cells: its value >= dual[theta, lambda] - lambda v (Lagrangian duality; lambda = 0
        is the memory-free bound)."""
        got = self._dual.get(key)
        if got is None:
            info = self.index.info[key]
            # the layer's own term depends on its row and the thresholds only: identical blocks share it
            own = (self.index.row_sig[info.layer], id(info.thetas))  # thetas: one array per set (TableIndex)
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
                parent, below = self.index.info[info.parent].thetas, self.dual(info.parent)
                if parent is info.thetas:  # the same set (interned): row for row
                    got = got + below
                else:
                    at = np.searchsorted(parent, info.thetas, side="right") - 1
                    got = got + np.where(at[:, None] >= 0, below[np.maximum(at, 0)], np.inf)
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
                keep, v, last = self._reserve(thetas, top)
                if len(keep):
                    relaxed = (self.dual(key)[keep] - self.lams[None, :] * v[:, None]).max(axis=1)
                    bound = np.maximum(free[v], relaxed)[last]
                    theta = thetas[keep][last]
                    order = np.lexsort((theta, bound))  # as sorted() orders the (bound, theta) pairs
                    bounds = list(zip(bound[order].tolist(), theta[order].tolist()))
            lower = min(upper, bounds[0][0]) if bounds else upper
            got = self._bounds_memo[key] = (upper, lower, bounds)
        return got

    def _reserve(self, thetas: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the thresholds below the largest whose cells are >= 0 and not `top`'s, their cells v,
        the positions in v of the largest threshold of each v: the one that counts, with the most
        strategies): memoised per set of thresholds (v is non-increasing in theta)."""
        got = self._reserved.get(id(thetas))
        if got is None:
            cells = self._cells_of(thetas[:-1])
            keep = np.flatnonzero((cells >= 0) & (cells != top))
            v = cells[keep]
            last = np.flatnonzero(np.append(v[1:] != v[:-1], True)) if len(v) else v
            got = self._reserved[id(thetas)] = (keep, v, last)
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
            val = float(state.column(self.cells(theta)).min()) if len(state.rows) else math.inf
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
        s = state.argmin(state.column(v))
        out, k = [s], key
        while info[k].parent:
            v -= int(self.w[info[k].layer, s])
            prev = self.state(info[k].parent, restrict)
            if info[k].incoming == SEAM:
                s = prev.argmin(prev.column(v))
            else:
                s = prev.argmin(prev.column(v) + self.c * self.index.table.switch_time[info[k].incoming][prev.rows, s])
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
        self.p2p, self.p2p_list = [], []
        for ix in indexes:  # c x each boundary's send, then 0 after the last layer: per table and c
            cache_key = ("p2p", id(ix), c, p2p_bandwidth, p2p_latency)
            if cache_key not in solver_cache:
                sends = np.append(c * p2p_time(ix.table, slice(None), p2p_bandwidth, p2p_latency), 0.0)
                solver_cache[cache_key] = (sends, sends.tolist())
            sends, listed = solver_cache[cache_key]
            self.p2p.append(sends)
            self.p2p_list.append(listed)

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

    def _stages_max(self, segments, value, stop: float = math.inf) -> float:
        """max over stages of value(its solver, its sequence's key) + its sends; stopped at the
        first stage whose running max reaches `stop` (then that partial max: >= stop too)."""
        top = -math.inf
        for k, segs in enumerate(segments):
            sends = sum(self.p2p[k][b - 1] for _, b in segs)
            top = max(top, value(self.solvers[k], self.indexes[k].sequence(segs)) + sends)
            if top >= stop:
                break
        return top

    def fixed_lower(self, segments, stop: float = math.inf) -> float:
        """A lower bound of fixed(segments) from unrestricted DP states only (partial once it
        reaches `stop`: the stages after the first that does are not solved)."""
        return self._stages_max(segments, StageSolver.lower, stop)

    def even_upper(self, stop: float = math.inf) -> float:
        """The value of a real plan (even stages, each stage's unrestricted DP at budget M minus
        its largest temp) from unrestricted states only: an upper bound of this setting. Once it
        reaches `stop` (a bound it is only compared with) the other stages are not solved."""
        s = self.setting
        segments = even_segments(self.indexes[0].table.layers, s.pp, s.chunks)
        return math.inf if segments is None else self._stages_max(segments, StageSolver.upper, stop)

    def lower_bound(self, bound: float) -> float:
        """A lower bound of this setting's optimum from unrestricted DP states only (no
        temp-threshold passes); inf when it exceeds `bound`."""
        s = self.setting
        if s.chunks > 1:
            segments = even_segments(self.indexes[0].table.layers, s.pp, s.chunks)
            if segments is None:
                return math.inf
            low = self.fixed_lower(segments, math.nextafter(bound, math.inf))
            return math.inf if low > bound else low
        if not self._covers(bound):
            return math.inf
        return float(self._partition(bound, exact=False)[0][-1])

    def _covers(self, bound: float) -> bool:
        """Whether stages whose lower bounds (sends included) are each <= `bound` can cover the
        layers when a stage may be empty: a relaxation of _partition's, decided greedily (each
        stage reaching as far as it can is exact: a segment's bound grows with its layers, so a
        stage starting later reaches at least as far), in one scan per stage instead of the
        partition DP's every start - False proves lower_bound > bound (most settings it cuts)."""
        L, start = self.indexes[0].table.num_layers, 0
        for index, solver, p2p in zip(self.indexes, self.solvers, self.p2p_list):
            key, reach = 0, start
            for j in range(start + 1, L + 1):
                key = index.child(key, j - 1, FIRST if key == 0 else j - 2)
                low = solver.lower(key)
                if low > bound:
                    break
                if low + p2p[j - 1] <= bound:
                    reach = j
            start = reach
            if start == L:
                return True
        return False

    def best(self, bound: float) -> SettingPlan | None:
        """The optimal plan of this setting if its value is <= bound (min-max partition DP)."""
        s = self.setting
        if s.chunks > 1:
            plan = self.fixed(even_segments(self.indexes[0].table.layers, s.pp, s.chunks))
            return plan if plan is not None and plan.value <= bound else None
        bound = min(bound, self.even_upper(bound))
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
