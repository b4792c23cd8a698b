"""ZeRO-3 (sharded data parallelism) at run time: the functions the `sharded_data_parallel`
pass puts into the graph (the backend splits the parameters: pcompile.runtime.shards).

Each rank of the dp group stores 1/dp of a sharded parameter (a chunk along its `dim`).
Parameters are gathered in *units* (by default all of one layer's, as FSDP does per block),
one collective per unit and direction, each on one flat buffer:
  unit = sdp_prefetch((s1, s2, ..), (d1, d2, ..), "dp", dp)
      issues the unit's all-gather (all_gather_single of its concatenated shards, async)
  sdp_gather((s1, s2, ..), (d1, d2, ..), "dp", dp, prefetched=unit)
      forward:  waits for it and copies the full parameters out of the flat buffer (a tuple)
      backward: one reduce-scatter (reduce_scatter_single of the gradients laid out rank by
                rank) divided by dp, issued async
Why the division: every dp rank computes the mean loss of its 1/dp of the batch, so the
serial gradient (mean over the whole batch) is the average of the ranks' gradients; the
reduce-scatter leaves each rank its chunk of the sum, and /dp makes it the average.

ZeRO-3 also frees the gathered parameters after use. The graph drops its references after
each parameter's last use, but autograd would keep them alive until backward wherever an op
saves one (a Linear saves its weight to compute the input's gradient). So every op that
reads a gathered parameter runs through `sdp_module` / `sdp_function` / `sdp_method`, which
install saved-tensor hooks: a saved tensor that lives in a gathered parameter's storage (the
parameter or a view of it) is packed as a reference to its unit, and backward re-gathers the
unit once when it first unpacks one, and frees it when the unit's backward is done.

The schedule overlaps communication with compute as FSDP2 does, one unit ahead:
  forward   the pass puts unit k+1's sdp_prefetch right after unit k's sdp_gather, so its
            all-gather runs while unit k computes; sdp_gather waits for it before first use.
  backward  re-gathering a unit (its first unpack, or a checkpointed region's recompute)
            issues the re-gather of the unit backward reaches next (the nearest unit forward
            gathered before it that backward re-gathers), which runs while this unit's backward
            computes. When a unit's backward is done its reduce-scatter is issued async; the
            shards reach it through `_Port`, an autograd node created at sdp_prefetch, i.e.
            before the previous unit's ops: autograd's engine runs ready nodes latest-created
            first, so it runs the port after the previous unit's backward compute, and the
            reduce-scatter is waited there, hidden behind it. The gradients go to .grad
            through autograd (AccumulateGrad and its hooks: fp32 masters, the dp sync), so they
            are final when backward returns: no backend has to wait on anything (wait_pending
            is for quiescing the group). `serialized()` waits every collective where it is issued.
Transient memory per rank (U_k: unit k's gathered parameters in bytes, the full tensors of its
tp shards in the compute dtype; G_k = U_k in the gradient dtype; dp: the group size), on top
of the shards, their gradients and the last unit (gathered from forward to its backward):
  forward   U_k + U_{k+1} (1 + 1/dp): unit k's parameters, unit k+1's all-gather output and
            flat input; at unit k+1's wait its output and the parameters copied out of it are
            both alive (2 U_{k+1}) before the output is freed.
  backward  U_k + G_k + U_{k-1} (1 + 1/dp) + G_{k+1} (1 + 1/dp): unit k's re-gathered
            parameters and its gradients, unit k-1's re-gather in flight, unit k+1's
            reduce-scatter input and output in flight.
So with equal units: 2 U + U/dp in forward, 4 U + 2 U/dp in backward (the old synchronous
schedule: 2 U + U/dp in both). Without prefetch (pp > 1, `serialized()`) the next unit's
terms drop out.
With pipelining (pp > 1) pipeline_split re-creates parameter-only nodes (sdp_prefetch
among them) at their first use in each stage, so forward gathers and reduce-scatters are
issued right before they are waited; the backward re-gather prefetch still runs.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import weakref
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from pcompile.runtime import collectives, ops

_LIVE: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()  # gathered parameters alive right now
_OVERLAP = [True]  # False inside serialized()
_LAST: list["weakref.ref[_Unit] | None"] = [None]  # the unit forward gathered last: the next one's predecessor
_INFLIGHT: "weakref.WeakSet[_Unit]" = weakref.WeakSet()  # units with a collective in flight (wait_pending)


@contextlib.contextmanager
def serialized():
    """Run ZeRO-3's collectives unoverlapped: each waited right where it is issued, no
    prefetch (the same graph and buffers; what overlap hides is the difference)."""
    previous, _OVERLAP[0] = _OVERLAP[0], False
    try:
        yield
    finally:
        _OVERLAP[0] = previous


def _in_backward() -> bool:
    """Whether autograd's engine is running: sdp ops called then are a checkpointed region's
    recompute (FSDP2 asks the same way)."""
    return torch._C._current_graph_task_id() != -1


@dataclass(eq=False)
class _Unit:
    """One gather of parameters and its state through a step."""

    shards: tuple[torch.Tensor, ...]  # detached: what every (re-)gather reads
    dims: tuple[int, ...]
    key: str
    size: int
    ports: tuple[torch.Tensor, ...] | None = None  # the shards through _Port, until forward's gather takes them
    gathering: tuple | None = None  # all-gather: (handle or None once complete, flat output, flat input)
    full: list[torch.Tensor] | None = None  # re-gathered for backward, until the unit's backward is done
    scattering: tuple | None = None  # reduce-scatter in flight: (handle, flat output, flat input)
    grads: list[torch.Tensor] | None = None  # this rank's averaged gradient chunks, until _Port hands them on
    taken: bool = False  # forward's sdp_gather ran (another call is a checkpointed region's recompute)
    regathers: bool = False  # backward re-gathers it (saved references, or a recomputed region)
    done: bool = False  # its backward ran: never gathered again
    prev: "weakref.ref[_Unit] | None" = None  # the unit forward gathered before it (weak: no chain of steps)


def _issue_gather(shards: tuple[torch.Tensor, ...], group, size: int) -> tuple:
    """(handle, flat output, flat input) of an async all-gather of the concatenated shards."""
    flat = torch.cat([s.reshape(-1) for s in shards])
    out = flat.new_empty(size * flat.numel())
    return collectives.all_gather_single(out, flat, group, async_op=True), out, flat


def _all_gather_flat(shards: tuple[torch.Tensor, ...], dims: tuple[int, ...], key: str,
                     size: int) -> list[torch.Tensor]:
    """The full tensors of `shards` (chunks along `dims`) with one all-gather of their
    concatenation, waited now (a gather nothing prefetched)."""
    group = collectives._group(key)
    if group is None:  # simulated (shape checks): every rank's chunk is this rank's, as one repeat per tensor
        return _simulated_gather(shards, dims, size)
    work, out, _ = _issue_gather(shards, group, size)
    work.wait()
    return _copy_out(out, shards, dims, size)


def _copy_out(out: torch.Tensor, shards: tuple[torch.Tensor, ...], dims: tuple[int, ...],
              size: int) -> list[torch.Tensor]:
    """Full tensors from an all-gather's flat output (row r: rank r's shards, concatenated):
    one copy per parameter, a view when the unit is one parameter sharded along dim 0."""
    rows, full, offset = out.view(size, -1), [], 0
    for shard, dim in zip(shards, dims):
        n = shard.numel()
        parts = rows[:, offset:offset + n].view(size, *shard.shape)  # parts[r]: rank r's chunk
        full.append(parts.movedim(0, dim).flatten(dim, dim + 1))
        offset += n
    return full


def _issue_scatter(grads: tuple[torch.Tensor, ...], dims: tuple[int, ...], group, size: int) -> tuple:
    """(handle, flat output, flat input) of an async reduce-scatter of `grads`: row r of the
    flat input holds rank r's chunk of each (one copy per gradient), so each rank gets its
    chunks, summed."""
    shapes = [_chunk_shape(g, d, size) for g, d in zip(grads, dims)]
    rows = grads[0].new_empty(size, sum(shape.numel() for shape in shapes))
    offset = 0
    for grad, dim, shape in zip(grads, dims, shapes):
        chunks = grad.unflatten(dim, (size, shape[dim])).movedim(dim, 0)
        rows[:, offset:offset + shape.numel()].view(size, *shape).copy_(chunks)
        offset += shape.numel()
    out = rows.new_empty(rows.shape[1])
    return collectives.reduce_scatter_single(out, rows.view(-1), group, async_op=True), out, rows


def _chunk_shape(grad: torch.Tensor, dim: int, size: int) -> torch.Size:
    return grad.shape[:dim] + (grad.shape[dim] // size,) + grad.shape[dim + 1:]


def _averaged(out: torch.Tensor, shapes: list[torch.Size], size: int) -> list[torch.Tensor]:
    """This rank's gradient chunks (of `shapes`), averaged, from a reduce-scatter's flat output."""
    out.div_(size)
    chunks, offset = [], 0
    for shape in shapes:
        chunks.append(out[offset:offset + shape.numel()].view(shape))
        offset += shape.numel()
    return chunks


def _reduce_scatter_flat(grads: tuple[torch.Tensor, ...], dims: tuple[int, ...], key: str,
                         size: int) -> list[torch.Tensor]:
    """This rank's chunk of each gradient averaged over the group, with one reduce-scatter waited now."""
    group = collectives._group(key)
    if group is None:  # simulated: this rank's chunk of each, without cutting the other ranks'
        return _simulated_scatter(grads, dims, size)
    work, out, _ = _issue_scatter(grads, dims, group, size)
    work.wait()
    return _averaged(out, [_chunk_shape(g, d, size) for g, d in zip(grads, dims)], size)


def _start_gather(unit: _Unit) -> None:
    """Issue the unit's all-gather (async; simulated ones are made when taken)."""
    group = collectives._group(unit.key)
    if group is not None:
        unit.gathering = _issue_gather(unit.shards, group, unit.size)
        _INFLIGHT.add(unit)


def _gathered(unit: _Unit) -> list[torch.Tensor]:
    """The unit's full parameters: its all-gather in flight waited and copied out, or one now."""
    if unit.gathering is None:
        return _all_gather_flat(unit.shards, unit.dims, unit.key, unit.size)
    _wait_gather(unit)
    out, unit.gathering = unit.gathering[1], None
    return _copy_out(out, unit.shards, unit.dims, unit.size)


def _wait_gather(unit: _Unit) -> None:
    """The unit's all-gather in flight waited (its output kept, its input freed)."""
    if unit.gathering is not None and unit.gathering[0] is not None:
        unit.gathering[0].wait()
        unit.gathering = (None, unit.gathering[1], None)
    if unit.scattering is None:
        _INFLIGHT.discard(unit)


def _wait_scatter(unit: _Unit) -> None:
    """The unit's reduce-scatter in flight waited; its averaged chunks in unit.grads."""
    if unit.scattering is not None:
        work, out, _ = unit.scattering
        work.wait()
        unit.grads, unit.scattering = _averaged(out, [s.shape for s in unit.shards], unit.size), None
    if unit.gathering is None or unit.gathering[0] is None:
        _INFLIGHT.discard(unit)


def _simulated_gather(shards: tuple[torch.Tensor, ...], dims: tuple[int, ...], size: int) -> list[torch.Tensor]:
    """What _gathered gives when every rank holds this rank's chunks (the values a simulated
    all-gather has: `size` copies along `dim`), built as one repeat per tensor: the shape
    checks cost the same at dp = 2 and dp = 1024 (no list of `size` chunks is built)."""
    return [s.repeat(*[size if d == dim else 1 for d in range(s.dim())]) for s, dim in zip(shards, dims)]


def _simulated_scatter(grads: tuple[torch.Tensor, ...], dims: tuple[int, ...], size: int) -> list[torch.Tensor]:
    """What the reduce-scatter gives in simulation (this rank's chunk of each gradient, /
    size), cutting only this rank's chunk (Tensor.chunk's first: ceil(n / size) along `dim`)."""
    out = []
    for g, d in zip(grads, dims):
        chunk = g.narrow(d, 0, min(g.shape[d], -(-g.shape[d] // size)))
        out.append(chunk.reshape(-1).clone().div_(size).view(chunk.shape))
    return out


def _regathered(unit: _Unit) -> list[torch.Tensor]:
    """The unit's parameters for backward (gathered once, maybe prefetched); and the next re-gather issued."""
    if unit.full is None:
        unit.full = _gathered(unit)
        _prefetch_before(unit)
    return unit.full


def _prefetch_before(unit: _Unit) -> None:
    """Issue the re-gather of the unit backward reaches next: the nearest one forward gathered
    before `unit` that backward re-gathers (FSDP2's backward prefetch). Decided from the units'
    flags alone, the same on every rank of the group, as the collective order must be."""
    if not _OVERLAP[0]:
        return
    prev = unit.prev() if unit.prev is not None else None
    while prev is not None and not prev.regathers:
        prev = prev.prev() if prev.prev is not None else None
    if prev is not None and not prev.done and prev.full is None and prev.gathering is None:
        _start_gather(prev)


class _Port(torch.autograd.Function):
    """The unit's shards as its gather reads them; backward: their reduce-scattered gradients,
    waited here. sdp_prefetch creates it before the previous unit's ops, so autograd (which runs
    ready nodes latest-created first) runs it after their backward: see the module doc."""

    @staticmethod
    def forward(ctx, unit: _Unit, *shards):
        ctx.unit = unit
        ctx.set_materialize_grads(False)  # the gather hands nothing in: the gradients come from the unit
        return tuple(s.view_as(s) for s in shards)

    @staticmethod
    def backward(ctx, *_):
        unit = ctx.unit
        _wait_scatter(unit)
        grads, unit.grads = unit.grads, None
        return (None,) + tuple(grads)


class _Gather(torch.autograd.Function):
    """The unit's gathered parameters (`full`) as outputs of its shards (or ports); backward
    reduce-scatters their gradients, handed on by the unit's port (else returned here)."""

    @staticmethod
    def forward(ctx, unit: _Unit, full: list[torch.Tensor], ported: bool, *inputs):
        ctx.unit, ctx.ported = unit, ported
        return tuple(t.detach() for t in full)

    @staticmethod
    def backward(ctx, *grads):
        unit = ctx.unit
        unit.done, unit.full = True, None  # every op of the unit is done with backward: free the re-gathered weights
        if unit.gathering is not None:  # a re-gather nobody took (a recompute that stopped before it)
            _wait_gather(unit)
            unit.gathering = None
        none = (None, None, None) + (None,) * len(grads)
        group = collectives._group(unit.key)
        if ctx.ported and _OVERLAP[0] and group is not None:  # the port waits for it
            unit.scattering = _issue_scatter(grads, unit.dims, group, unit.size)
            _INFLIGHT.add(unit)
            return none
        chunks = _reduce_scatter_flat(grads, unit.dims, unit.key, unit.size)
        if ctx.ported:
            unit.grads = chunks
            return none
        return (None, None, None) + tuple(chunks)


def _new_unit(shards, dims, axis: str, size: int) -> _Unit:
    unit = _Unit(tuple(s.detach() for s in shards), tuple(dims), axis, size)
    if torch.is_grad_enabled() and any(s.requires_grad for s in shards):
        unit.ports = _Port.apply(unit, *shards)
    return unit


@ops.collective(axis_arg=2)
def sdp_prefetch(shards: tuple[torch.Tensor, ...], dims: tuple[int, ...], axis: str, size: int) -> _Unit | None:
    """Issue a unit's all-gather now (async): the sdp_gather naming the returned unit waits for
    it. In a checkpointed region's recompute nothing: forward's unit is what backward uses."""
    if _in_backward():
        return None
    unit = _new_unit(shards, dims, axis, size)
    if _OVERLAP[0]:
        _start_gather(unit)
    return unit


@ops.collective(axis_arg=2)
def sdp_gather(shards: tuple[torch.Tensor, ...], dims: tuple[int, ...], axis: str, size: int,
               prefetched: _Unit | None = None, recomputed: bool = False) -> tuple[torch.Tensor, ...]:
    """Sharded parameters -> full parameters: the all-gather `prefetched` issued (or one now)
    forward, one reduce-scatter / size backward. `recomputed`: the gather runs in a checkpointed
    region (backward re-runs it: a re-gather to prefetch)."""
    unit = prefetched if prefetched is not None else _new_unit(shards, dims, axis, size)
    if unit.taken:  # a checkpointed region's recompute: forward's unit re-gathered (maybe prefetched)
        return _Gather.apply(unit, _regathered(unit), False, *shards)
    unit.taken, unit.regathers = True, recomputed
    if not _in_backward():
        unit.prev, _LAST[0] = _LAST[0], weakref.ref(unit)
    ported = unit.ports is not None
    inputs, unit.ports = (unit.ports if ported else shards), None  # dropped: the ports' node holds the unit
    full = _Gather.apply(unit, _gathered(unit), ported, *inputs)
    for index, tensor in enumerate(full):
        tensor._pcompile_sdp = (unit, index)
        _LIVE.add(tensor)
    return full


def wait_pending() -> int:
    """Wait for every ZeRO-3 collective still in flight; returns how many units had one. A
    training step needs no call: its reduce-scatters are waited inside backward and its
    prefetches taken in it. For quiescing the groups (after a backward that did not reach
    every unit, before destroying them)."""
    units = list(_INFLIGHT)
    for unit in units:
        _wait_gather(unit)
        _wait_scatter(unit)
    return len(units)


def live_gathered() -> int:
    """How many gathered parameters are alive (0 between forward and backward under ZeRO-3)."""
    return len(_LIVE)


# -- ops that read gathered parameters -----------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Saved:
    """A saved tensor that was (a view of) gathered parameter `index` of `unit`."""

    unit: _Unit
    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _gathered_leaves(tree) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and hasattr(t, "_pcompile_sdp")]


@contextlib.contextmanager
def _saved_as_shards(gathered: list[torch.Tensor]):
    """Autograd saves (views of) these gathered parameters as references to their shards."""
    if not gathered or not torch.is_grad_enabled():
        yield
        return
    sources = {g.untyped_storage().data_ptr(): g._pcompile_sdp for g in gathered}

    def pack(t: torch.Tensor):
        if t.layout == torch.strided:
            source = sources.get(t.untyped_storage().data_ptr())
            if source is not None:
                source[0].regathers = True
                return _Saved(*source, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(saved):
        if isinstance(saved, _Saved):
            return _regathered(saved.unit)[saved.index].as_strided(saved.size, saved.stride, saved.offset)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@ops.local
def module_with(module: torch.nn.Module, params: dict[str, torch.Tensor], *args, **kwargs):
    """`module(*args, **kwargs)` with some of its parameters replaced by `params` (gathered ones).
    Used as is in checkpointed layers, where checkpointing frees and recomputes what ops save."""
    return torch.func.functional_call(module, dict(params), args, kwargs)


@ops.local
def sdp_module(module: torch.nn.Module, params: dict[str, torch.Tensor], *args, **kwargs):
    """`module_with`, autograd saving the gathered parameters as references to their unit."""
    with _saved_as_shards(list(params.values())):
        return module_with(module, params, *args, **kwargs)


@functools.cache
def resolve(qualname: str):
    """The function named `qualname` (as torch.fx's `_get_qualified_name` writes it): a module's
    attribute, or an operator overload ("torch.ops.aten.embedding.default", torch.export's ops)."""
    if qualname.startswith("torch.ops."):
        op = torch.ops
        for part in qualname.split(".")[2:]:
            op = getattr(op, part)
        return op
    module, _, attr = qualname.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@ops.local
def sdp_function(qualname: str, *args, **kwargs):
    """`fn(*args, **kwargs)` for the function named `qualname`, some args being gathered parameters."""
    with _saved_as_shards(_gathered_leaves((args, kwargs))):
        return resolve(qualname)(*args, **kwargs)


@ops.local
def sdp_method(name: str, self, *args, **kwargs):
    """`self.name(*args, **kwargs)`, some operands being gathered parameters."""
    with _saved_as_shards(_gathered_leaves((self, args, kwargs))):
        return getattr(self, name)(*args, **kwargs)
