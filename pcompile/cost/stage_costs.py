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

Expert parallelism: under a strategy with ep > 1 each layer holding a mixture of experts the
ep rewrite runs (pcompile.cost.moe.ep_layers) is priced as its work without the dense mixture
plus the experts (moe.ep_layer_cost); every other layer as under the same strategy with ep = 1
(the rewrite leaves it alone). The search offers ep only on the former (passes/search_runs.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pcompile.cluster import Cluster
from pcompile.cost.layer_work import NodeFacts, boundary_bytes, example_batch, layer_work
from pcompile.cost.moe import ep_layer_cost, ep_layers, plain
from pcompile.cost.pricing import (
    CostOptions,
    StageLayout,
    compute_times,
    distinct_groups,
    layer_cost,
    stage_layout,
    switch_time,
    table_entries,
)
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.mesh import regroup_groups
from pcompile.search.costtable import CostTable


class StageCosts:
    """cost_table(ir, cluster, d, mb, strategies, options with first_rank) with shared work."""

    def __init__(self, ir: IR, cluster: Cluster, options: CostOptions, planned: dict | None = None):
        """`planned`: tp degree -> tp_rules.plan_tensor_parallel's result for every layer at
        that degree, when the caller has it (layer_work's, computed otherwise)."""
        self.ir, self.cluster, self.options = ir, cluster, options
        self.layers = tuple(ir.layers)
        self.batch = example_batch(ir)
        self.bounds = np.array(boundary_bytes(ir), dtype=float)
        self.planned = planned or {}
        self._facts: NodeFacts | None = None  # shared by every tp degree's layer_work
        self._works: dict[int, tuple[list, list[int]]] = {}  # tp -> (distinct works, work index per layer)
        self._classes: dict[tuple[int, int], int] = {}  # (first, devices) -> stage class id
        self._class_ids: dict[tuple, int] = {}
        self._tables: dict[tuple, CostTable] = {}
        self._columns: dict[tuple, np.ndarray] = {}  # (stage class, micro-batch, strategy) -> [L, 6]
        self._layouts: dict[tuple, StageLayout] = {}  # (stage class, dp, tp) -> its groups and devices
        self._switches: dict[tuple, tuple] = {}  # (stage class, coarse, fine) -> the regrouping's groups
        self._compute: dict[tuple, tuple[float, float]] = {}  # compute_times memo
        self._moe: dict | None = None  # layer -> (MoEShape, dense mixture nodes): moe.ep_layers
        self._ep_works: dict[int, dict] = {}  # tp -> layer -> its work without the dense mixture

    @property
    def moe(self) -> dict:
        """The layers ep can run ({layer: (MoEShape, mixture nodes)}), found when first asked."""
        if self._moe is None:
            self._moe = ep_layers(self.ir)
        return self._moe

    def ep_work(self, tp: int, layer: str):
        """The MoE layer's work without its dense mixture (what the ep rewrite leaves), at `tp`."""
        if tp not in self._ep_works:
            self._facts = self._facts or NodeFacts(self.ir)
            skip = frozenset().union(*(nodes for _, nodes in self.moe.values()))
            per_layer = layer_work(self.ir, tp, self.planned.get(tp), self._facts, skip)
            self._ep_works[tp] = {name: per_layer[name] for name in self.moe}
        return self._ep_works[tp][layer]

    def works(self, tp: int) -> tuple[list, list[int]]:
        if tp not in self._works:
            self._facts = self._facts or NodeFacts(self.ir)
            per_layer = layer_work(self.ir, tp, self.planned.get(tp), self._facts)
            distinct: dict = {}
            index = [distinct.setdefault(per_layer[layer], len(distinct)) for layer in self.layers]
            self._works[tp] = (list(distinct), index)
        return self._works[tp]

    def stage_class(self, first: int, devices: int) -> int:
        """What the stage's costs can depend on - each rank's device and node, relative to the
        first - as a small id (equal stages, equal ids)."""
        key = (first, devices)
        if key not in self._classes:
            per = self.cluster.devices_per_node
            ranks = tuple((self.cluster.device_of(r), r // per - first // per) for r in range(first, first + devices))
            self._classes[key] = self._class_ids.setdefault(ranks, len(self._class_ids))
        return self._classes[key]

    def table(self, first: int, devices: int, microbatch: int, strategies: tuple,
              accumulating: bool = False) -> CostTable:
        """The CostTable of the stage of `devices` ranks from `first` at this micro-batch size;
        `accumulating`: several micro-batches per step (CostOptions.accumulating)."""
        if first + devices > self.cluster.num_devices:
            raise PcompileError(f"a stage of {devices} devices from rank {first} does not fit the cluster's "
                                f"{self.cluster.num_devices} devices", "lower devices_per_stage or first_rank")
        key = (self.stage_class(first, devices), microbatch, strategies, accumulating)
        if key not in self._tables:
            self._tables[key] = self._build(first, devices, microbatch, strategies, accumulating)
        return self._tables[key]

    def layout(self, first: int, s) -> StageLayout:
        key = (self.stage_class(first, s.num_devices), s.dp, s.tp)
        if key not in self._layouts:
            self._layouts[key] = stage_layout(self.cluster, first, s)
        return self._layouts[key]

    def _build(self, first: int, devices: int, microbatch: int, strategies: tuple, accumulating: bool) -> CostTable:
        options = dataclasses.replace(self.options, first_rank=first, accumulating=accumulating)
        stage = self.stage_class(first, devices)
        L, S = len(self.layers), len(strategies)
        columns = np.zeros((S, L, 6))
        for j, s in enumerate(strategies):
            if not (s.num_devices == devices and microbatch % s.dp == 0):
                columns[j, :, :3] = np.inf  # fwd, bwd, sync: impossible; memory 0
                continue
            key = (stage, microbatch, s, accumulating and s.sharded_grads)  # it changes ZeRO's price only
            if key not in self._columns:
                self._columns[key] = self._column(first, s, microbatch, options)
            columns[j] = self._columns[key]
        fwd, bwd, sync, state, act, temp = (np.ascontiguousarray(columns[:, :, n].T) for n in range(6))
        bounds = self.bounds * microbatch / self.batch * options.activation_scale
        switch = np.zeros((max(L - 1, 0), S, S))
        if L > 1:
            sizes, at = np.unique(bounds, return_inverse=True)
            # one switch_time per pair of activation layouts (dp, tp, sp), spread to every pair of
            # strategies with those layouts; strategies of other stages' sizes switch at 0
            valid = [j for j, s in enumerate(strategies) if s.num_devices == devices]
            kinds: dict[tuple, int] = {}
            kind = np.array([kinds.setdefault((strategies[j].dp, strategies[j].tp, strategies[j].sp), len(kinds))
                             for j in valid], dtype=np.int64)
            first_of = {k: valid[int(np.flatnonzero(kind == k)[0])] for k in kinds.values()}
            pairs = np.zeros((len(kinds), len(kinds), len(sizes)))
            for ka, a in first_of.items():
                for kb, b in first_of.items():
                    pairs[ka, kb] = self._switch(stage, first, sizes, strategies[a], strategies[b])
            per_size = np.zeros((len(sizes), S, S))
            if valid:
                per_size[:, np.array(valid)[:, None], np.array(valid)[None, :]] = (
                    pairs[kind[:, None], kind[None, :]].transpose(2, 0, 1))
            switch = per_size[at.reshape(-1)]
        return CostTable(layers=self.layers, strategies=strategies, devices_per_stage=devices,
                         microbatch_size=microbatch, fwd_time=fwd, bwd_time=bwd, sync_time=sync, state_memory=state,
                         activation_memory=act, temp_memory=temp, switch_time=switch, boundary_bytes=bounds)

    def _switch(self, stage: int, first: int, sizes: np.ndarray, sa, sb) -> list[float]:
        """switch_time of every boundary size from layout `sa` to `sb` (memoised per stage class:
        the regrouping's groups reduced to distinct ones once)."""
        na, nb = sa.dp * (sa.tp if sa.sp else 1), sb.dp * (sb.tp if sb.sp else 1)
        if na == nb:
            return [0.0] * len(sizes)
        fine, coarse = max(na, nb), min(na, nb)
        key = (stage, coarse, fine)
        groups = self._switches.get(key)
        if groups is None:
            groups = self._switches[key] = distinct_groups(
                self.cluster, regroup_groups(sa.num_devices, coarse, fine, first))
        return [switch_time(self.cluster, float(n), sa, sb, first, groups) for n in sizes]

    def _column(self, first: int, s, microbatch: int, options: CostOptions) -> np.ndarray:
        """[L, 6]: fwd, bwd, sync, state, act, temp of every layer under strategy `s`."""
        distinct, index = self.works(s.tp)
        foreach = options.foreach(self.cluster)
        layout = self.layout(first, s)
        rows = [table_entries(layer_cost(work, self.cluster, plain(s), microbatch, self.batch, options, layout,
                                         self.compute_times), foreach)
                for work in distinct]
        column = np.array(rows)[index]
        if s.ep > 1:  # the mixtures of experts under ep (moe.ep_layer_cost); the other layers as above
            priced: dict[tuple, tuple] = {}  # identical blocks: one price
            for i, layer in enumerate(self.layers):
                if layer in self.moe:
                    work, shape = self.ep_work(s.tp, layer), self.moe[layer][0]
                    if shape.num_experts % s.ep:  # the rewrite refuses it (a forced plan: passes/search.py)
                        column[i, :3] = np.inf
                        continue
                    key = (id(work), dataclasses.replace(shape, layer=""))
                    if key not in priced:
                        priced[key] = table_entries(ep_layer_cost(work, shape, self.cluster, s, microbatch, self.batch,
                                                                  options, layout, self.compute_times), foreach)
                    column[i] = priced[key]
        return column

    def compute_times(self, work, device, scale: float, s, act: float) -> tuple[float, float]:
        """pricing.compute_times, memoised on what it reads of the strategy (split, and tp under
        sp): the same samples per rank recur across (micro-batch, dp) pairs."""
        key = (id(work), id(device), scale, s.split, s.tp if s.sp else 1, act)
        got = self._compute.get(key)
        if got is None:
            got = self._compute[key] = compute_times(work, device, scale, s, act)
        return got
