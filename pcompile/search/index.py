"""The cost tables as the plan search's DP (pcompile.search.dp) reads them.

Per CostTable: fwd + bwd time, signatures of the layers' rows and of the switch matrices (so
identical blocks share DP states and memos), switch matrices compressed to classes of identical
rows and columns, the strategies each layer keeps (`TableIndex.kept`: dominated ones dropped),
and interned keys of layer sequences (a trie: a key is its parent sequence plus one layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pcompile.errors import PcompileError
from pcompile.search.costtable import CostTable

FIRST, SEAM = -2, -1  # incoming edge of a stage's first layer / of a chunk's first layer (no switch)


def unique(values: np.ndarray) -> np.ndarray:
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
        distinct = {sig: unique(table.temp_memory[l, valid[l]]) for sig, l in first.items()}
        self.temps = [distinct[sig] for sig in self.row_sig]
        self.switch_sig = _signatures([table.switch_time[b].tobytes() for b in range(table.num_layers - 1)])
        # a layer's place: its row and the switch matrices on either side (what `kept` reads)
        self.place_sig = _signatures([(self.row_sig[l], self.switch_sig[l - 1] if l else -1,
                                       self.switch_sig[l] if l < table.num_layers - 1 else -1)
                                      for l in range(table.num_layers)])
        self.switch_classes: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._kept: dict[int, np.ndarray] = {}
        self.keys: dict[tuple[int, int, int], int] = {}
        self._sequences: dict[tuple, int] = {}  # segments -> key (sequence's memo)
        self._thetas: dict[bytes, np.ndarray] = {}
        self.info: list[_Key] = [_key(-1, -1, FIRST, np.empty(0))]

    def child(self, parent: int, layer: int, incoming: int) -> int:
        """The key of sequence `parent` + `layer` (entered through `incoming`)."""
        edge = self.switch_sig[incoming] if incoming >= 0 else incoming
        sig = (parent, edge, self.row_sig[layer])
        key = self.keys.get(sig)
        if key is None:
            key = len(self.info)
            self.keys[sig] = key
            thetas = unique(np.concatenate([self.info[parent].thetas, self.temps[layer]]))  # np.union1d
            # one array per distinct set (most sequences share a few): the solvers' memos key on it
            thetas = self._thetas.setdefault(thetas.tobytes(), thetas)
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

    def compressed_switch(self, boundary: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, rows, targets): strategies grouped by identical switch rows (source classes:
        `labels[s]`) and by identical columns (target classes: `targets[s]`); rows[c, t] is the
        switch time from source class c to target class t.
        min over s' of f[s'] + sw[s', s] = min over c of (min over s' in c of f[s']) + rows[c, t(s)]."""
        sig = self.switch_sig[boundary]
        if sig not in self.switch_classes:
            rows, labels = np.unique(self.table.switch_time[boundary], axis=0, return_inverse=True)
            cols, targets = np.unique(rows, axis=1, return_inverse=True)
            self.switch_classes[sig] = (labels.reshape(-1), cols, targets.reshape(-1))
        return self.switch_classes[sig]

    def kept(self, layer: int) -> np.ndarray:
        """[strategy] False where a lower-indexed strategy a dominates this one, b: time, sync,
        state, activation and temp all <= b's, and the same switch row and column on either
        side. Then for every c, r, rounding and theta, a is valid where b is, w[a] <= w[b] and
        cost[a] <= cost[b], so f[a] <= f[b] in every cell (a state is non-increasing) and
        every later layer reads the same minima: b changes no value, and no argmin either
        (a comes first on a tie). Dropped before the DP; bounds and thresholds keep it."""
        sig = self.place_sig[layer]
        got = self._kept.get(sig)
        if got is None:
            t, S = self.table, self.table.num_strategies
            sync = np.where(np.isfinite(t.sync_time[layer]), t.sync_time[layer], np.inf)
            m = np.stack([self.time[layer], sync, t.state_memory[layer], t.activation_memory[layer],
                          t.temp_memory[layer]])
            beats = np.triu(np.ones((S, S), dtype=bool), 1)  # [a, b]: a < b
            beats &= (m[:, :, None] <= m[:, None, :]).all(axis=0)
            if layer > 0:
                targets = self.compressed_switch(layer - 1)[2]
                beats &= targets[:, None] == targets[None, :]
            if layer < t.num_layers - 1:
                labels = self.compressed_switch(layer)[0]
                beats &= labels[:, None] == labels[None, :]
            got = self._kept[sig] = ~beats.any(axis=0)
        return got


def _signatures(blobs: list) -> list[int]:
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
