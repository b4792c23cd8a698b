"""Data-parallel gradient averaging overlapped with backward, as DDP does it.

The gradients are packed into buckets (pcompile.runtime.buckets: the first of up to 1 MiB,
then 25 MiB), parameters in reverse registration order (roughly the order backward produces
their gradients). As DDP's gradient_as_bucket_view, every gradient is a view into its
bucket's flat buffer, set before the step's backward, so autograd accumulates into the bucket
and the all-reduce runs on it in place: no copy of the gradients is made (a buffer is kept
while its views stay the parameters' gradients, else a new one is allocated and whatever
gradients there were are copied in). A post-accumulate-grad hook on each parameter counts its
accumulations; once a parameter has had all it gets in the step (one per backward; on a
pipeline rank, one per micro-batch and stage holding it, so a bucket goes with the last
micro-batch's backward) it is ready, and when every parameter of a bucket is ready its
all-reduce is issued asynchronously while backward goes on. `finish()` (after backward) issues
the buckets still waiting (parameters without a gradient this step), waits for all, and divides
by the group size. Every dp rank runs the same graph, so the buckets are issued in the same
order everywhere, as collectives must be.

Under mixed precision the hooks sit on the bf16 parameters after MasterWeights' own (which
adds the gradient into the fp32 master's: the bucket views), and the buckets hold the fp32
master gradients. Gradients accumulated under no_sync stay in the buckets and are part of the sum.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from pcompile.runtime.buckets import GRAD_BUCKET_BYTES, bucket_ranges


class _Bucket:
    def __init__(self, members: list[tuple[torch.Tensor, torch.Tensor]]):
        self.leaves = [leaf for leaf, _ in members]
        self.holders = [holder for _, holder in members]
        self.offsets = [0, *itertools.accumulate(h.numel() for h in self.holders)]
        self.buffer: torch.Tensor | None = None

    def _is_view(self, holder: torch.Tensor, offset: int) -> bool:
        g = holder.grad
        return (g is not None and self.buffer is not None and g.dtype == self.buffer.dtype
                and g.data_ptr() == self.buffer.data_ptr() + offset * self.buffer.element_size()
                and g.shape == holder.shape and g.is_contiguous())

    def attach(self) -> None:
        """Every holder's .grad a view into the flat buffer (see the module docstring)."""
        if all(self._is_view(h, o) for h, o in zip(self.holders, self.offsets)):
            return
        first = self.holders[0]
        buffer = torch.zeros(self.offsets[-1], dtype=first.dtype, device=first.device)
        for holder, start, stop in zip(self.holders, self.offsets, self.offsets[1:]):
            view = buffer[start:stop].view_as(holder)
            if holder.grad is not None:
                view.copy_(holder.grad)
            holder.grad = view
        self.buffer = buffer


class OverlappedAllReduce:
    """Average the gradients of `params` over `group` (of `size` ranks), each bucket issued as
    soon as its gradients are final. `params`: (leaf parameter autograd accumulates into, the
    tensor whose .grad is averaged - the leaf, or its fp32 master), in registration order;
    `expected`: id(leaf) -> accumulations per step (default 1)."""

    def __init__(self, params: list[tuple[torch.Tensor, torch.Tensor]], group, size: int, expected: dict[int, int],
                 bucket_bytes: int = GRAD_BUCKET_BYTES):
        self.group, self.size = group, size
        ordered = list(reversed(params))
        self.buckets = []
        for _, run in itertools.groupby(ordered, key=lambda pair: (pair[1].dtype, pair[1].device)):
            run = list(run)  # one dtype and device per flat buffer
            sizes = [holder.numel() * holder.element_size() for _, holder in run]
            self.buckets += [_Bucket(run[a:b]) for a, b in bucket_ranges(sizes, bucket_bytes)]
        self._bucket_of = {id(leaf): i for i, bucket in enumerate(self.buckets) for leaf in bucket.leaves}
        self._expected = {id(leaf): expected.get(id(leaf), 1) for leaf, _ in ordered}
        self._counts: dict[int, int] = {}
        self._ready = [0] * len(self.buckets)
        self._works: dict[int, object] = {}
        self._active = False
        self.handles = [leaf.register_post_accumulate_grad_hook(self._accumulated) for leaf, _ in ordered
                        if leaf.requires_grad]

    def begin(self, sync: bool) -> None:
        """Before a step's backward: the gradients become bucket views; `sync` False (no_sync)
        issues nothing."""
        for bucket in self.buckets:
            bucket.attach()
        self._counts = dict.fromkeys(self._expected, 0)
        self._ready = [0] * len(self.buckets)
        self._works = {}
        self._active = sync

    def _accumulated(self, leaf: torch.Tensor) -> None:
        if not self._active:
            return
        key = id(leaf)
        self._counts[key] += 1
        if self._counts[key] == self._expected[key]:
            index = self._bucket_of[key]
            self._ready[index] += 1
            if self._ready[index] == len(self.buckets[index].leaves):
                self._issue(index)

    def _issue(self, index: int) -> None:
        self._works[index] = dist.all_reduce(self.buckets[index].buffer, group=self.group, async_op=True)

    def finish(self) -> None:
        """After backward: issue the buckets still waiting, wait for all, divide by the group size."""
        if not self._active:
            return
        for index in range(len(self.buckets)):  # in bucket order on every rank
            if index not in self._works:
                self._issue(index)
        for index, work in self._works.items():
            work.wait()
            self.buckets[index].buffer.div_(self.size)
        self._works = {}
        self._active = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
