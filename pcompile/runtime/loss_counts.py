"""The whole step's counts of masked-mean losses (passes/normalise_loss.py), at run time: each
rank counts its own part of the batch with `IR.loss_counts.gm` and the ranks that split the
batch sum their counts, so every rank and micro-batch divides by the same total.

The sum is issued before the forward and waited where the loss first reads it (the graph's
`step_count` node, placed by normalise_loss just before the division): the all-reduce of a few
doubles runs while the forward computes, as DDP hides its gradient all-reduces behind backward.
On a slow network a synchronous sum before the forward costs one latency per step on the
critical path (benchmarks/runtime_overhead.py --latency-ms)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from pcompile.ir import LossCounts
from pcompile.runtime.ops import local


class _Sum:
    """The step's counts of every masked term, their all-reduce maybe still in flight: waited
    once, by the first term read."""

    def __init__(self, total: torch.Tensor, work):
        self.total, self.work = total, work

    def read(self, index: int) -> float:
        if self.work is not None:
            self.work.wait()
            self.work = None
        value = float(self.total[index])
        return value if value != 0 else 1.0


class PendingCount:
    """One masked term's step count: its index in the step's (possibly pending) sum."""

    def __init__(self, counts: _Sum, index: int):
        self._counts, self._index = counts, index

    def value(self) -> float:
        return self._counts.read(self._index)


@local
def step_count(count) -> float:
    """The step's count of a masked term: waits for its all-reduce when it is still in flight
    (a PendingCount); a number (the default 1.0, a test's own count) is that number."""
    return count.value() if isinstance(count, PendingCount) else count


def _local_counts(counts: LossCounts, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([torch.as_tensor(c).reshape(()) for c in counts.gm(*inputs)]).double()


def issue_step_counts(counts: LossCounts | None, inputs: tuple, group) -> dict[str, PendingCount]:
    """Placeholder name -> the step's count of its term: this rank's counts of `inputs`, their
    sum over `group` issued asynchronously (None: this rank holds the whole batch). Where nothing
    counts at all the count reads 1 (the term's sum is 0 as well: an all-ignored batch
    contributes 0, not 0 / 0)."""
    if counts is None:
        return {}
    total = _local_counts(counts, inputs)
    summed = _Sum(total, dist.all_reduce(total, group=group, async_op=True) if group is not None else None)
    return {name: PendingCount(summed, index) for index, name in enumerate(counts.placeholders)}


def step_counts(counts: LossCounts | None, inputs: tuple, group) -> dict[str, float]:
    """`issue_step_counts` waited at once: the counts as numbers (eval steps, pipelined schedules
    that pass them to every stage)."""
    return {name: pending.value() for name, pending in issue_step_counts(counts, inputs, group).items()}
