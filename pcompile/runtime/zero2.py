"""ZeRO-2 at run time: parameters replicated over the dp group, gradients and optimizer states
sharded over it (DeepSpeed's stage 2; a layer whose Strategy has zero2=True).

Each ZeRO-2 parameter keeps its full (tp-local) tensor in the module, as plain dp does, and
gets a *chunk*: a separate Parameter holding this rank's 1/dp of it along its first dim the
group divides (`shardings`: a Shard over the parameter's dp axis, like ZeRO-3's). The chunks
are what the user's optimizer steps (`cm.parameters()` lists them under the parameters'
names), so its states exist for 1/dp of the parameter only, and checkpoints, full_state_dict,
full_grads and the gradient norm see them as they see ZeRO-3's chunks. A parameter read by
a zero2 layer and another kind (a tied embedding / head) stays as the other reader has it.

Per step:
  1. `pull()` before forward: every chunk (maybe stepped by the optimizer, or loaded by a
     checkpoint) all-gathered back into the replicated parameters (one flat all-gather per
     bucket, IN_FLIGHT at a time). Not overlapped with anything: pcompile
     cannot know when the optimizer steps, so the gather runs when the parameters are read next:
     at every train_step and eval_step, also between no_sync() accumulation steps (k gathers
     for k steps, where one would do: skipping one on "no chunk changed" would need a test
     every rank agrees on, and a version counter misses writes through .data - a silently
     stale replica is worse than a gather). A pipeline rank gathers before the step's first
     micro-batch.
  2. backward: a post-accumulate-grad hook per parameter (after MasterWeights' under mixed
     precision, so the fp32 master's gradient is what is reduced); once every parameter of a
     bucket (pcompile.runtime.buckets, reverse registration order as DDP's) has its gradient,
     the bucket's reduce-scatter is issued asynchronously while backward goes on (the same
     flat layout as ZeRO-3's: row r holds rank r's chunk of each gradient, one copy per
     gradient) and the full gradients are dropped; at most IN_FLIGHT buckets are in flight (the
     oldest is waited before another is issued), so the gradient bytes alive at once are the
     bucket backward fills and IN_FLIGHT buckets' copies, not the whole model's gradients.
  3. `finish()` after backward: issue the buckets still waiting (parameters without a
     gradient this step), wait for all, divide by `divisor` (dp; under mixed layouts the
     number of loss parts, see backends/layer_groups.py) and hand each chunk its part as .grad.
Under no_sync() nothing is reduced: the full gradients accumulate in the module's parameters
and the next synced step reduces the sum. Each chunk then gets a zero .grad as a marker that
gradients are pending (so train_step knows), and if the user zeroes it (zero_grad), the pending
full gradients are dropped at the next step, as zero_grad would have dropped DDP's.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from pcompile.ir.params import param_layers, under_every_name
from pcompile.ir.placement import Shard, local_shape
from pcompile.runtime import collectives
from pcompile.runtime.buckets import GRAD_BUCKET_BYTES, bucket_ranges
from pcompile.runtime.sdp import _copy_out, _issue_scatter

IN_FLIGHT = 2  # buckets whose collective may be in flight at once (their flat copies alive)
BUCKET_BYTES = GRAD_BUCKET_BYTES  # the cap of every bucket but the first (read at lowering; tests lower it)


def shardings(ir, plan) -> dict[str, Shard]:
    """Every name of each parameter read only by zero2 layers -> its Shard over its dp axis (the
    first dim of its tp shard the group divides). Left out (plain dp, all-reduced): ZeRO-3
    parameters, frozen ones, and those no dim of which the group divides (a bias of 3)."""
    layout = ir.mixed_layout
    out = {}
    for name, layers in param_layers(ir).items():
        strategies = [plan.strategy_for(layer) for layer in layers]
        param = ir.gm.get_parameter(name)
        if not strategies or not all(s.zero2 for s in strategies) or name in ir.sdp_shardings \
                or not param.requires_grad:
            continue
        axis, size = layout.param_axes[name] if layout is not None else ("dp", strategies[0].dp)
        shape = local_shape(param.shape, ir.param_shardings.get(name))
        dim = next((d for d, n in enumerate(shape) if n % size == 0 and n >= size), None)
        if size > 1 and dim is not None:
            out[name] = Shard(axis, dim, size)
    return under_every_name(ir.gm, out)


@dataclass(eq=False)
class _Member:
    leaf: torch.Tensor  # the module's parameter (autograd accumulates into it)
    holder: torch.Tensor  # whose .grad is reduced: the leaf, or its fp32 master
    shard: Shard
    chunk: torch.nn.Parameter  # this rank's part of the holder: what the optimizer steps
    marker: tuple[torch.Tensor, int] | None = None  # (zero .grad set after a no_sync step, its version)


class ShardedGradients:
    """ZeRO-2 for `params`: (leaf, holder, Shard) in registration order, each holder's .grad
    reduce-scattered over groups[shard.axis] and divided by `divisor`; `coords`: this rank's
    coordinate on each axis; `expected`: id(leaf) -> accumulations per step (default 1; a
    pipeline rank: one per micro-batch and stage holding it, so a bucket goes with the last
    micro-batch's backward)."""

    def __init__(self, params: list[tuple[torch.Tensor, torch.Tensor, Shard]], groups: dict, coords: dict,
                 divisor: int, expected: dict[int, int] | None = None, bucket_bytes: int | None = None):
        self.groups, self.divisor = groups, divisor
        members = []
        for leaf, holder, shard in params:
            piece = shard.chunk(holder.detach(), coords[shard.axis]).clone(memory_format=torch.contiguous_format)
            members.append(_Member(leaf, holder, shard, torch.nn.Parameter(piece, requires_grad=True)))
        self._chunk = {id(m.holder): m.chunk for m in members}
        ordered = list(reversed(members))
        self.buckets: list[list[_Member]] = []
        for _, run in itertools.groupby(ordered, key=lambda m: (m.shard.axis, m.holder.dtype, m.holder.device)):
            run = list(run)  # one group, dtype and device per collective
            sizes = [m.holder.numel() * m.holder.element_size() for m in run]
            self.buckets += [run[a:b] for a, b in bucket_ranges(sizes, bucket_bytes or BUCKET_BYTES)]
        self._bucket_of = {id(m.leaf): i for i, bucket in enumerate(self.buckets) for m in bucket}
        self._expected = {id(m.leaf): (expected or {}).get(id(m.leaf), 1) for m in members}
        self._ready = [0] * len(self.buckets)
        self._counts: dict[int, int] = {}
        self._works: dict[int, tuple] = {}  # in flight, in issue order
        self._issued: set[int] = set()
        self._active = False
        self.handles = [m.leaf.register_post_accumulate_grad_hook(self._accumulated) for m in ordered]

    def chunk(self, tensor: torch.Tensor) -> torch.Tensor:
        """The chunk the optimizer steps for this holder; any other tensor as it is."""
        return self._chunk.get(id(tensor), tensor)

    def _members(self):
        return (m for bucket in self.buckets for m in bucket)

    # -- values --------------------------------------------------------------------------------
    @torch.no_grad()
    def pull(self) -> None:
        """Collective: the chunks all-gathered into the replicated holders (see the module doc)."""
        works: dict[int, tuple] = {}
        for index, bucket in enumerate(self.buckets):
            if index - IN_FLIGHT in works:
                self._gathered(index - IN_FLIGHT, *works.pop(index - IN_FLIGHT))
            shard = bucket[0].shard
            flat = torch.cat([m.chunk.detach().reshape(-1) for m in bucket])
            out = flat.new_empty(shard.size * flat.numel())
            works[index] = collectives.all_gather_single(out, flat, self.groups[shard.axis], async_op=True), out
        for index, (work, out) in works.items():
            self._gathered(index, work, out)

    def _gathered(self, index: int, work, out: torch.Tensor) -> None:
        work.wait()
        bucket = self.buckets[index]
        full = _copy_out(out, tuple(m.chunk for m in bucket), tuple(m.shard.dim for m in bucket), bucket[0].shard.size)
        for m, value in zip(bucket, full):
            m.holder.copy_(value)

    @torch.no_grad()
    def push(self, coords: dict) -> None:
        """The holders' values (just initialised or loaded) -> the chunks (local)."""
        for m in self._members():
            m.chunk.copy_(m.shard.chunk(m.holder, coords[m.shard.axis]))

    # -- gradients -----------------------------------------------------------------------------
    def begin(self, sync: bool) -> None:
        """Before a step's backward. Full gradients pending from no_sync steps are dropped when
        the user zeroed their chunk's marker since (zero_grad, either way)."""
        for m in self._members():
            if m.marker is not None and (m.chunk.grad is not m.marker[0] or m.marker[0]._version != m.marker[1]):
                m.holder.grad, m.marker = None, None
        self._ready = [0] * len(self.buckets)
        self._counts, self._works, self._issued, self._active = dict.fromkeys(self._expected, 0), {}, set(), sync

    def _accumulated(self, leaf: torch.Tensor) -> None:
        if not self._active:
            return
        self._counts[id(leaf)] += 1
        if self._counts[id(leaf)] != self._expected[id(leaf)]:
            return
        index = self._bucket_of[id(leaf)]
        self._ready[index] += 1
        if self._ready[index] == len(self.buckets[index]):
            self._issue(index)

    def _issue(self, index: int) -> None:
        while len(self._works) >= IN_FLIGHT:  # the oldest first (dicts keep issue order)
            self._reduced(next(iter(self._works)))
        bucket = self.buckets[index]
        had = [m.holder.grad is not None for m in bucket]
        grads = tuple(m.holder.grad if m.holder.grad is not None else torch.zeros_like(m.holder) for m in bucket)
        shard = bucket[0].shard
        work, out, _ = _issue_scatter(grads, tuple(m.shard.dim for m in bucket), self.groups[shard.axis],
                                      shard.size)  # copies the gradients: the full ones can go
        for m in bucket:
            m.holder.grad = None
        self._works[index] = (work, out, had)
        self._issued.add(index)

    def _reduced(self, index: int) -> None:
        """Bucket `index`'s reduce-scatter waited, divided, each chunk's part handed to its .grad."""
        work, out, had = self._works.pop(index)
        work.wait()
        out.div_(self.divisor)
        offset = 0
        for m, present in zip(self.buckets[index], had):
            part = out[offset:offset + m.chunk.numel()].view_as(m.chunk)
            offset += m.chunk.numel()
            if present:
                m.chunk.grad = part if m.chunk.grad is None else m.chunk.grad.add_(part)

    def finish(self) -> None:
        """After backward: issue what still waits, wait for all, each chunk's averaged part as .grad."""
        if not self._active:
            for m in self._members():  # gradients pending in the holders: marked on the chunks
                if m.holder.grad is not None and m.marker is None and m.chunk.grad is None:
                    m.chunk.grad = torch.zeros_like(m.chunk)
                    m.marker = (m.chunk.grad, m.chunk.grad._version)
            return
        for m in self._members():
            m.marker = None  # the pending gradients are in this step's sums
        for index in range(len(self.buckets)):  # in bucket order on every rank
            if index not in self._issued:
                self._issue(index)
        while self._works:
            self._reduced(next(iter(self._works)))
        self._active = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
