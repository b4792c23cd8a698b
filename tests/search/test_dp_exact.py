"""The stage DP's speed-ups keep its plans and its ties (issue #16): a strategy is dropped before
the DP only when a lower-indexed one dominates it (TableIndex.kept), duplicates tie to the first,
and the states' compact form (h behind V infs) gives the rows a plain DP gives."""
from __future__ import annotations

import itertools
import math

import numpy as np

from pcompile.plan import Strategy
from pcompile.search.costtable import CostTable
from pcompile.search.dp import StageSolver
from pcompile.search.index import TableIndex

STRATEGIES = (Strategy(dp=2), Strategy(dp=2, checkpoint=True), Strategy(dp=2, sdp=True), Strategy(dp=2, zero2=True))


def _table(time, state, act=None, temp=None, switch=None) -> CostTable:
    time = np.asarray(time, dtype=float)
    L, S = time.shape
    zeros = np.zeros((L, S))
    return CostTable(layers=tuple(f"l{i}" for i in range(L)), strategies=STRATEGIES[:S], devices_per_stage=2,
                     microbatch_size=2, fwd_time=time, bwd_time=zeros.copy(), sync_time=zeros.copy(),
                     state_memory=np.asarray(state, dtype=float),
                     activation_memory=zeros.copy() if act is None else np.asarray(act, dtype=float),
                     temp_memory=zeros.copy() if temp is None else np.asarray(temp, dtype=float),
                     switch_time=np.zeros((L - 1, S, S)) if switch is None else np.asarray(switch, dtype=float),
                     boundary_bytes=np.zeros(L - 1))


def test_kept_drops_only_what_a_lower_index_dominates():
    # s1 is s0 but slower (dropped); s0 is dominated by s2 (a higher index: kept, it wins ties);
    # s3 is as fast as s0 but reads another switch row (kept)
    switch = np.zeros((1, 4, 4))
    switch[0, 3, :] = 1.0
    index = TableIndex(_table([[2, 3, 1, 2], [2, 3, 1, 2]], [[5, 5, 4, 5], [5, 5, 4, 5]], switch=switch))
    assert index.kept(0).tolist() == [True, False, True, True]
    assert index.kept(1).tolist() == [True, False, True, False]  # no switch after the last layer: s3 == s0


def test_duplicates_tie_to_the_first_and_values_match_a_plain_dp():
    rng = np.random.default_rng(0)
    for _ in range(30):
        L, S = 4, 4
        time = rng.integers(1, 4, size=(L, S)).astype(float)
        state = rng.integers(0, 4, size=(L, S)).astype(float)
        time[:, 2], state[:, 2] = time[:, 0], state[:, 0]  # an exact duplicate of s0
        temp = rng.integers(0, 2, size=(L, S)).astype(float)
        switch = rng.integers(0, 2, size=(L - 1, S, S)) * 0.5
        switch[:, :, 2], switch[:, 2, :] = switch[:, :, 0], switch[:, 0, :]
        switch[:, 2, 2] = switch[:, 0, 0]
        index = TableIndex(_table(time, state, temp=temp, switch=switch))
        budget = float(rng.integers(4, 14))
        solver = StageSolver(index, 1.0, 1.0, budget, 20, True)
        key = index.sequence(((0, L),))
        value, _ = solver.value(key)
        # exhaustive: c T + S with the transient (max temp) reserved, weights on the ceil grid
        best = math.inf
        step = budget / 20
        for choice in itertools.product(range(S), repeat=L):
            cells = sum(math.ceil(state[l, s] / step * (1 + 1e-12)) for l, s in enumerate(choice))
            reserved = math.ceil(max(temp[l, s] for l, s in enumerate(choice)) / step * (1 + 1e-12))
            if cells + reserved <= 20:
                cost = sum(time[l, s] for l, s in enumerate(choice))
                best = min(best, cost + sum(switch[l, a, b] for l, (a, b) in enumerate(zip(choice, choice[1:]))))
        assert value == best
        if math.isfinite(value):
            assert 2 not in solver.strategies(key)  # s2 only ever ties s0, which comes first
