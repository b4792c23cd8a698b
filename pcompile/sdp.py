"""ZeRO-3 (sharded data parallelism) at run time: the functions the `sharded_data_parallel`
pass puts into the graph, and the lowering helpers the backend uses for sharded parameters.

Each rank of the dp group stores 1/dp of a sharded parameter (a chunk along `dim`).
  sdp_gather(shard, dim, "dp", dp)   forward: all-gather the chunks -> the full parameter
                                     backward: reduce-scatter the gradient, divided by dp
Why the division: every dp rank computes the mean loss of its 1/dp of the batch, so the
serial gradient (mean over the whole batch) is the average of the ranks' gradients; the
reduce-scatter leaves each rank its chunk of the sum, and /dp makes it the average.

ZeRO-3 also frees the gathered parameter after use. The graph drops its own reference after
the last use, but autograd would keep it alive until backward wherever an op saves it (a
Linear saves its weight to compute the input's gradient). So every op that reads a gathered
parameter runs through `sdp_module` / `sdp_function` / `sdp_method`, which install
saved-tensor hooks: a saved tensor that lives in a gathered parameter's storage (the
parameter or a view of it) is packed as a reference to the shard and re-gathered when
backward unpacks it. Peak parameter memory is then one op's gathered weights, not all.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree

from pcompile import collectives
from pcompile.ir import ParamSharding

_LIVE: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()  # gathered parameters alive right now


@dataclass(frozen=True, eq=False)
class _Source:
    """Where a gathered parameter comes from, so that backward can gather it again."""

    shard: torch.Tensor
    dim: int
    key: str
    size: int

    def gather(self) -> torch.Tensor:
        return collectives._all_gather(self.shard, self.dim, self.key, self.size)


@dataclass(frozen=True, eq=False)
class _Saved:
    """A saved tensor that was (a view of) a gathered parameter: its source and its view."""

    source: _Source
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _reduce_scatter_mean(grad: torch.Tensor, dim: int, key: str, size: int) -> torch.Tensor:
    group = collectives._group(key)
    parts = [part.contiguous() for part in grad.chunk(size, dim=dim)]
    if group is None:
        return parts[0].clone()
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out.div_(size)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, dim, key, size):
        ctx.dim, ctx.key, ctx.size = dim, key, size
        return collectives._all_gather(shard, dim, key, size)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_mean(grad, ctx.dim, ctx.key, ctx.size), None, None, None


def sdp_gather(shard: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Sharded parameter -> full parameter: all-gather forward, reduce-scatter / size backward."""
    full = _Gather.apply(shard, dim, axis, size)
    full._pcompile_sdp = _Source(shard.detach(), dim, axis, size)
    _LIVE.add(full)
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
                return _Saved(source, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(saved):
        if isinstance(saved, _Saved):
            return saved.source.gather().as_strided(saved.size, saved.stride, saved.offset)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def sdp_module(module: torch.nn.Module, params: dict[str, torch.Tensor], *args, **kwargs):
    """`module(*args, **kwargs)` with some of its parameters replaced by gathered ones."""
    with _saved_as_shards(list(params.values())):
        return torch.func.functional_call(module, dict(params), args, kwargs)


@functools.cache
def resolve(qualname: str):
    """The function named `qualname` (as torch.fx's `_get_qualified_name` writes it)."""
    module, _, attr = qualname.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def sdp_function(qualname: str, *args, **kwargs):
    """`fn(*args, **kwargs)` for the function named `qualname`, some args being gathered parameters."""
    with _saved_as_shards(_gathered((args, kwargs))):
        return resolve(qualname)(*args, **kwargs)


def sdp_method(name: str, self, *args, **kwargs):
    """`self.name(*args, **kwargs)`, some operands being gathered parameters."""
    with _saved_as_shards(_gathered((self, args, kwargs))):
        return getattr(self, name)(*args, **kwargs)


COLLECTIVES = (sdp_gather,)  # nodes whose axis-name arguments the backend binds to process groups


# -- lowering helpers (the backend's part) ---------------------------------------------------
def param_shardings(gm: fx.GraphModule) -> dict[str, ParamSharding]:
    """How each sdp parameter is sharded, read from the graph's sdp_gather nodes. It applies to
    the tensor left after IR.param_shardings (tensor parallelism) took this rank's slice."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is sdp_gather:
            shard, dim, axis, size = node.args
            out[shard.target] = ParamSharding(axis, dim, size)
    return out


def _owner(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def shard_parameters(gm: torch.nn.Module, shardings: dict[str, ParamSharding],
                     coords: dict[str, int]) -> dict[str, ParamSharding]:
    """Keep this rank's chunk of every sdp parameter, under every name it has (tied weights stay
    tied). Returns the sharding of every name, aliases included (state_dict lists them all)."""
    by_alias = {}
    for name, sharding in shardings.items():
        full = gm.get_parameter(name)
        chunk = full.detach().chunk(sharding.size, dim=sharding.dim)[coords[sharding.axis]].clone()
        local = torch.nn.Parameter(chunk, requires_grad=full.requires_grad)
        aliases = [alias for alias, p in gm.named_parameters(remove_duplicate=False) if p is full]
        for alias in aliases:
            owner, attr = _owner(gm, alias)
            setattr(owner, attr, local)
            by_alias[alias] = sharding
    return by_alias


def unshard(local: torch.Tensor, sharding: ParamSharding | None, group) -> torch.Tensor:
    """The tensor before `sharding` split it (collective over `group`)."""
    if sharding is None or sharding.size == 1:
        return local
    parts = [torch.empty_like(local, memory_format=torch.contiguous_format) for _ in range(sharding.size)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, dim=sharding.dim)
