"""The search's cost tables, built fast and exactly equal to pcompile.cost.pricing.cost_table.

The search asks for a table per (stage, devices per stage, micro-batch size, strategies);
cost_table recomputes each layer's work (tp_rules and a walk of the graph) per call and
costs every (layer, strategy) pair. On a 96-block model over 1024 devices that is ~all of
the search time. The tables only depend on

- each layer's LayerWork per tp (computed once per tp here, not per table),
- the stage's devices and which of its ranks share a node (not on the absolute ranks:
  pcompile.cluster prices a collective by group size and link kind only),

and identical blocks have identical LayerWork, so one layer_cost per distinct work and
strategy fills all their rows, and one switch_time per distinct boundary size and layout
pair fills the switch matrices. A strategy's column is kept per (stage class, micro-batch
size), so a table over the union of other tables' strategies (the search's mixed-tp runs)
only costs its switch matrices. tests/search/test_stage_costs.py checks the tables equal
cost_table's entry by entry.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pcompile.cluster import Cluster
from pcompile.cost.layer_work import boundary_bytes, example_batch, layer_work
from pcompile.cost.pricing import CostOptions, layer_cost, switch_time, table_entries
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.search.costtable import CostTable


class StageCosts:
    """cost_table(ir, cluster, d, mb, strategies, options with first_rank) with shared work."""

    def __init__(self, ir: IR, cluster: Cluster, options: CostOptions):
        self.ir, self.cluster, self.options = ir, cluster, options
        self.layers = tuple(ir.layers)
        self.batch = example_batch(ir)
        self.bounds = np.array(boundary_bytes(ir), dtype=float)
        self._works: dict[int, tuple[list, list[int]]] = {}  # tp -> (distinct works, work index per layer)
        self._classes: dict[tuple[int, int], tuple] = {}
        self._tables: dict[tuple, CostTable] = {}
        self._columns: dict[tuple, np.ndarray] = {}  # (stage class, micro-batch, strategy) -> [L, 6]

    def works(self, tp: int) -> tuple[list, list[int]]:
        if tp not in self._works:
            per_layer = layer_work(self.ir, tp)
            distinct: dict = {}
            index = [distinct.setdefault(per_layer[layer], len(distinct)) for layer in self.layers]
            self._works[tp] = (list(distinct), index)
        return self._works[tp]

    def stage_class(self, first: int, devices: int) -> tuple:
        """What the stage's costs can depend on: each rank's device and node, relative to the first."""
        key = (first, devices)
        if key not in self._classes:
            per = self.cluster.devices_per_node
            self._classes[key] = tuple((self.cluster.device_of(r), r // per - first // per)
                                       for r in range(first, first + devices))
        return self._classes[key]

    def table(self, first: int, devices: int, microbatch: int, strategies: tuple) -> CostTable:
        if first + devices > self.cluster.num_devices:
            raise PcompileError(f"a stage of {devices} devices from rank {first} does not fit the cluster's "
                                f"{self.cluster.num_devices} devices", "lower devices_per_stage or first_rank")
        key = (self.stage_class(first, devices), microbatch, strategies)
        if key not in self._tables:
            self._tables[key] = self._build(first, devices, microbatch, strategies)
        return self._tables[key]

    def _build(self, first: int, devices: int, microbatch: int, strategies: tuple) -> CostTable:
        options = dataclasses.replace(self.options, first_rank=first)
        L, S = len(self.layers), len(strategies)
        arrays = {k: np.zeros((L, S)) for k in ("fwd", "bwd", "sync", "state", "act", "temp")}
        for j, s in enumerate(strategies):
            if not (s.num_devices == devices and microbatch % s.dp == 0):
                for k in ("fwd", "bwd", "sync"):
                    arrays[k][:, j] = np.inf
                continue
            key = (self.stage_class(first, devices), microbatch, s)
            if key not in self._columns:
                self._columns[key] = self._column(s, microbatch, options)
            column = self._columns[key]
            for n, k in enumerate(("fwd", "bwd", "sync", "state", "act", "temp")):
                arrays[k][:, j] = column[:, n]
        bounds = self.bounds * microbatch / self.batch * options.activation_scale
        switch = np.zeros((max(L - 1, 0), S, S))
        if L > 1:
            sizes, at = np.unique(bounds, return_inverse=True)
            valid = [j for j, s in enumerate(strategies) if s.num_devices == devices]
            per_size = np.zeros((len(sizes), S, S))
            memo: dict = {}
            for a in valid:
                for b in valid:
                    sa, sb = strategies[a], strategies[b]
                    layout = (sa.dp, sa.tp, sa.sp, sb.dp, sb.tp, sb.sp)
                    if layout not in memo:
                        memo[layout] = [switch_time(self.cluster, float(n), sa, sb, first) for n in sizes]
                    per_size[:, a, b] = memo[layout]
            switch = per_size[at.reshape(-1)]
        return CostTable(layers=self.layers, strategies=strategies, devices_per_stage=devices,
                         microbatch_size=microbatch, fwd_time=arrays["fwd"], bwd_time=arrays["bwd"],
                         sync_time=arrays["sync"], state_memory=arrays["state"], activation_memory=arrays["act"],
                         temp_memory=arrays["temp"], switch_time=switch, boundary_bytes=bounds)

    def _column(self, s, microbatch: int, options: CostOptions) -> np.ndarray:
        """[L, 6]: fwd, bwd, sync, state, act, temp of every layer under strategy `s`."""
        distinct, index = self.works(s.tp)
        foreach = options.foreach(self.cluster)
        rows = [table_entries(layer_cost(work, self.cluster, s, microbatch, self.batch, options), foreach)
                for work in distinct]
        return np.array(rows)[index]
