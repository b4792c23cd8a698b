"""The exhaustive oracle: every setting, every stage partition, every strategy per layer."""
from __future__ import annotations

import itertools
import math

import numpy as np

from pcompile.search.engine import SearchContext
from pcompile.search.space import even_segments


def partitions(L: int, pp: int):
    for cuts in itertools.combinations(range(1, L), pp - 1):
        bounds = (0,) + cuts + (L,)
        yield tuple(((bounds[k], bounds[k + 1]),) for k in range(pp))


def oracle(problem):
    """(best step time, its setting, segments, choice) over all fitting plans; (inf, ...) if none."""
    ctx = SearchContext(problem)
    L = len(problem.layers)
    best = (math.inf, None, None, None)
    for setting in ctx.settings:
        tables = ctx.tables(setting)
        if tables is None:
            continue
        S = tables[0].num_strategies
        choices = np.array(list(itertools.product(range(S), repeat=L)), dtype=np.int64).reshape(-1, L)
        budgets = problem.budgets(setting.pp)
        c = setting.coefficient
        if setting.chunks > 1:
            options = [even_segments(problem.layers, setting.pp, setting.chunks)]
        else:
            options = list(partitions(L, setting.pp))
        for segments in options:
            value = np.zeros(len(choices))
            fits = np.ones(len(choices), dtype=bool)
            for k, segs in enumerate(segments):
                tab = tables[k]
                T = np.zeros(len(choices))
                sync, state, act, temp = (np.zeros(len(choices)) for _ in range(4))
                for a, b in segs:
                    for l in range(a, b):
                        s = choices[:, l]
                        T += tab.fwd_time[l, s] + tab.bwd_time[l, s]
                        sync += tab.sync_time[l, s]
                        state += tab.state_memory[l, s]
                        act += tab.activation_memory[l, s]
                        temp = np.maximum(temp, tab.temp_memory[l, s])
                        if l + 1 < b:
                            T += tab.switch_time[l, s, choices[:, l + 1]]
                    if b < L:
                        sent = tab.boundary_bytes[b - 1] / tab.send_split  # each dp replica its part
                        T += 2 * (problem.p2p_latency + sent / problem.p2p_bandwidth)
                value = np.maximum(value, c * T + sync)
                fits &= state + setting.in_flight(k) * act + temp <= budgets[k]
            value = np.where(fits & np.isfinite(value), value, np.inf)
            j = int(np.argmin(value))
            if value[j] < best[0]:
                best = (float(value[j]), setting, segments, tuple(int(x) for x in choices[j]))
    return best
