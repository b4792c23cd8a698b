"""ZeRO-3 (sharded data parallelism) at run time: the functions the `sharded_data_parallel`
pass puts into the graph (the backend splits the parameters: pcompile.runtime.shards).

Each rank of the dp group stores 1/dp of a sharded parameter (a chunk along its `dim`).
Parameters are gathered in *units* (by default all of one layer's, as FSDP does per block),
one collective per unit and direction:
  sdp_gather((s1, s2, ..), (d1, d2, ..), "dp", dp)
      forward:  one all-gather of the concatenated shards -> the full parameters (a tuple)
      backward: one reduce-scatter of the concatenated gradient chunks, divided by dp
Why the division: every dp rank computes the mean loss of its 1/dp of the batch, so the
serial gradient (mean over the whole batch) is the average of the ranks' gradients; the
reduce-scatter leaves each rank its chunk of the sum, and /dp makes it the average.

ZeRO-3 also frees the gathered parameters after use. The graph drops its references after
each parameter's last use, but autograd would keep them alive until backward wherever an op
saves one (a Linear saves its weight to compute the input's gradient). So every op that
reads a gathered parameter runs through `sdp_module` / `sdp_function` / `sdp_method`, which
install saved-tensor hooks: a saved tensor that lives in a gathered parameter's storage (the
parameter or a view of it) is packed as a reference to its unit, and backward re-gathers the
unit once (one all-gather) when it first unpacks one, and frees it when the unit's
reduce-scatter runs, i.e. when the backward of every op of the unit is done.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from pcompile.runtime import collectives, ops

_LIVE: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()  # gathered parameters alive right now


def _all_gather_flat(shards: tuple[torch.Tensor, ...], dims: tuple[int, ...], key: str,
                     size: int) -> list[torch.Tensor]:
    """The full tensors of `shards` (chunks along `dims`) with one all-gather of their concatenation."""
    group = collectives._group(key)
    if group is None:  # simulated (shape checks): every rank's chunk is this rank's, as one repeat per tensor
        return _simulated_gather(shards, dims, size)
    flat = torch.cat([s.reshape(-1) for s in shards])
    parts = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(parts, flat, group=group)
    out, offset = [], 0
    for shard, dim in zip(shards, dims):
        n = shard.numel()
        out.append(torch.cat([part[offset:offset + n].view(shard.shape) for part in parts], dim=dim))
        offset += n
    return out


def _reduce_scatter_flat(grads: tuple[torch.Tensor, ...], dims: tuple[int, ...], key: str,
                         size: int) -> list[torch.Tensor]:
    """This rank's chunk of each gradient averaged over the group, with one reduce-scatter."""
    group = collectives._group(key)
    if group is None:  # simulated: this rank's chunk of each, without cutting the other ranks'
        return _simulated_scatter(grads, dims, size)
    chunks = [g.chunk(size, dim=d) for g, d in zip(grads, dims)]
    inputs = [torch.cat([c[rank].reshape(-1) for c in chunks]) for rank in range(size)]
    flat = torch.empty_like(inputs[0])
    dist.reduce_scatter(flat, inputs, group=group)
    flat.div_(size)
    out, offset = [], 0
    for c in chunks:
        n = c[0].numel()
        out.append(flat[offset:offset + n].view(c[0].shape))
        offset += n
    return out


def _simulated_gather(shards: tuple[torch.Tensor, ...], dims: tuple[int, ...], size: int) -> list[torch.Tensor]:
    """What _all_gather_flat gives when every rank holds this rank's chunks (the values a
    simulated all-gather has: `size` copies along `dim`), built as one repeat per tensor: the
    shape checks cost the same at dp = 2 and dp = 1024 (no list of `size` chunks is built)."""
    return [s.repeat(*[size if d == dim else 1 for d in range(s.dim())]) for s, dim in zip(shards, dims)]


def _simulated_scatter(grads: tuple[torch.Tensor, ...], dims: tuple[int, ...], size: int) -> list[torch.Tensor]:
    """What _reduce_scatter_flat gives in simulation (this rank's chunk of each gradient, /
    size), cutting only this rank's chunk (Tensor.chunk's first: ceil(n / size) along `dim`)."""
    out = []
    for g, d in zip(grads, dims):
        chunk = g.narrow(d, 0, min(g.shape[d], -(-g.shape[d] // size)))
        out.append(chunk.reshape(-1).clone().div_(size).view(chunk.shape))
    return out


@dataclass(eq=False)
class _Unit:
    """Parameters gathered together; `full` caches their re-gathered values during backward."""

    shards: tuple[torch.Tensor, ...]
    dims: tuple[int, ...]
    key: str
    size: int
    full: list[torch.Tensor] | None = field(default=None, repr=False)

    def regathered(self) -> list[torch.Tensor]:
        if self.full is None:
            self.full = _all_gather_flat(self.shards, self.dims, self.key, self.size)
        return self.full


@dataclass(frozen=True, eq=False)
class _Saved:
    """A saved tensor that was (a view of) gathered parameter `index` of `unit`."""

    unit: _Unit
    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit: _Unit, *shards):
        ctx.unit = unit
        return tuple(_all_gather_flat(shards, unit.dims, unit.key, unit.size))

    @staticmethod
    def backward(ctx, *grads):
        unit = ctx.unit
        unit.full = None  # every op of the unit is done with backward: free the re-gathered weights
        return (None,) + tuple(_reduce_scatter_flat(grads, unit.dims, unit.key, unit.size))


@ops.collective(axis_arg=2)
def sdp_gather(shards: tuple[torch.Tensor, ...], dims: tuple[int, ...], axis: str,
               size: int) -> tuple[torch.Tensor, ...]:
    """Sharded parameters -> full parameters: one all-gather forward, one reduce-scatter / size backward."""
    unit = _Unit(tuple(s.detach() for s in shards), tuple(dims), axis, size)
    full = _Gather.apply(unit, *shards)
    for index, tensor in enumerate(full):
        tensor._pcompile_sdp = (unit, index)
        _LIVE.add(tensor)
    return full


def live_gathered() -> int:
    """How many gathered parameters are alive (0 between forward and backward under ZeRO-3)."""
    return len(_LIVE)


# -- ops that read gathered parameters -----------------------------------------------------
def _gathered(tree) -> list[torch.Tensor]:
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
                return _Saved(*source, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(saved):
        if isinstance(saved, _Saved):
            return saved.unit.regathered()[saved.index].as_strided(saved.size, saved.stride, saved.offset)
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
    with _saved_as_shards(_gathered((args, kwargs))):
        return resolve(qualname)(*args, **kwargs)


@ops.local
def sdp_method(name: str, self, *args, **kwargs):
    """`self.name(*args, **kwargs)`, some operands being gathered parameters."""
    with _saved_as_shards(_gathered((self, args, kwargs))):
        return getattr(self, name)(*args, **kwargs)

