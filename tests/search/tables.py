"""Random cost tables for the search tests: a deterministic CostTable per stage query."""
from __future__ import annotations

import numpy as np

from pcompile.search.costtable import CostTable


class RandomCosts:
    """cost(query) -> CostTable drawn from (seed, query); identical blocks when `same_blocks`."""

    def __init__(self, layers, seed: int, same_blocks: bool = False, hetero: bool = False, inf_rate: float = 0.1):
        self.layers, self.seed, self.same_blocks = layers, seed, same_blocks
        self.hetero, self.inf_rate = hetero, inf_rate
        self.cache = {}

    def __call__(self, q) -> CostTable:
        stage_key = q.stage if self.hetero else 0
        key = (q.pp, stage_key, q.devices_per_stage, q.microbatch_size, q.strategies)
        if key not in self.cache:
            self.cache[key] = self._draw(q, stage_key)
        return self.cache[key]

    def _draw(self, q, stage_key) -> CostTable:
        rng = np.random.default_rng([self.seed, q.pp, stage_key, q.devices_per_stage, q.microbatch_size])
        L, S = len(self.layers), len(q.strategies)
        scale = q.microbatch_size / 8

        def draw(lo, hi, shape=(L, S)):
            x = rng.uniform(lo, hi, size=shape)
            if self.same_blocks and L > 2:
                x[1:-1] = x[1]
            return x

        fwd = draw(0.1, 1.0) * scale
        bwd = fwd * draw(1.0, 3.0)
        bad = draw(0, 1) < self.inf_rate
        bad[np.arange(L), rng.integers(0, S, size=L)] = False  # every layer keeps a strategy
        if self.same_blocks and L > 2:
            bad[1:-1] = bad[1]
        fwd[bad] = np.inf
        switch = rng.uniform(0, 0.3, size=(max(L - 1, 0), S, S)) * (rng.uniform() < 0.7)
        if self.same_blocks and L > 3:
            switch[1:-1] = switch[1]
        return CostTable(layers=tuple(self.layers), strategies=q.strategies, devices_per_stage=q.devices_per_stage,
                         microbatch_size=q.microbatch_size, fwd_time=fwd, bwd_time=bwd,
                         sync_time=draw(0.0, 0.5), state_memory=draw(0.0, 10.0),
                         activation_memory=draw(0.0, 5.0) * scale, temp_memory=draw(0.0, 3.0),
                         switch_time=switch, boundary_bytes=rng.uniform(0, 1e9, size=max(L - 1, 0)))
