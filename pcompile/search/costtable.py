"""The contract between the cost model and the search: per-layer costs of every strategy.

The cost model (pcompile.cost.pricing) fills a `CostTable` for one pipeline setting (devices per
stage, micro-batch size); the search (pcompile.search.dp) only reads tables, so it can be
tested on random tables against an exhaustive oracle.

Arrays are numpy, indexed [layer, strategy]; an impossible (layer, strategy) pair has
time = inf. Times are seconds, memory is bytes per device.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pcompile.plan import Strategy


@dataclass(frozen=True)
class CostTable:
    layers: tuple[str, ...]  # in graph order: "pre", blocks..., "post"
    strategies: tuple[Strategy, ...]  # the same candidate list for every layer
    devices_per_stage: int
    microbatch_size: int
    fwd_time: np.ndarray  # [L, S] forward time of one micro-batch (compute + tp/sp comm)
    bwd_time: np.ndarray  # [L, S] backward time of one micro-batch (incl. recompute if checkpointed)
    # [L, S] per-step gradient communication (dp all-reduce / sdp gather + reduce-scatter), not overlapped
    sync_time: np.ndarray
    state_memory: np.ndarray  # [L, S] params + grads + optimizer states per device
    activation_memory: np.ndarray  # [L, S] bytes kept for backward per in-flight micro-batch
    temp_memory: np.ndarray  # [L, S] transient peak while the layer runs (gathered weights, largest op)
    switch_time: np.ndarray  # [L-1, S, S] resharding the activation between layer i (strategy a) and i+1 (b)
    boundary_bytes: np.ndarray  # [L-1] activation bytes crossing from layer i to i+1 (pipeline p2p sends)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_strategies(self) -> int:
        return len(self.strategies)

    @cached_property  # read for every layer of every stage solver: once per table
    def send_split(self) -> int:
        """How many links a pipeline send's boundary bytes spread over, at least: each of a stage's
        dp replicas sends its own part of the micro-batch to its peer in the next stage, in
        parallel; the smallest dp among the stage's strategies (exact when the stage's layers run
        at it - a uniform tp x dp pipeline at its largest tp - conservative otherwise: the search
        prices a send before choosing the strategies)."""
        dps = [s.dp for s in self.strategies if s.dp * s.tp == self.devices_per_stage]
        return min(dps, default=1)
