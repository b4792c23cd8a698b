"""Collectives as plain module-level functions, so they can be fx `call_function` targets and
show up as nodes in the IR. Each takes the mesh axis name and its size; the backend binds axis
names to this rank's process groups with `bind_group` before running a graph.

Why hand-written autograd Functions: torch's functional collectives differentiate as if the
loss were summed over ranks, but in tensor parallelism every rank of the group computes the
*same* loss. Megatron's conjugate pair is what keeps gradients exact:
  tp_copy   (f): forward identity,   backward all-reduce
  tp_reduce (g): forward all-reduce, backward identity

Sequence parallelism (Megatron-3) splits the activations *outside* the tp region along the
sequence dim, so the conjugate pairs become, each with the backward its forward needs:
  sp_split          : keep this rank's chunk,  backward all-gather      (enter the sp region)
  sp_gather         : all-gather,              backward reduce-scatter  (sp region -> column Linears)
  sp_reduce_scatter : reduce-scatter,          backward all-gather      (row Linears -> sp region)
  sp_unsplit        : all-gather,              backward keep the chunk  (leave the sp region)
sp_gather's backward sums because the column Linears' input gradients are partial (one per
weight shard); sp_unsplit's does not because the code after it is replicated, and every rank
already holds the full gradient there.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist

from pcompile.runtime import ops

_GROUPS: dict[str, dist.ProcessGroup] = {}
_SIMULATE = threading.local()


def bind_group(key: str, group: dist.ProcessGroup) -> None:
    _GROUPS[key] = group


def unbind_groups(groups) -> None:
    """Forget every key bound to one of `groups`: a binding keeps its process group (and the
    group's gloo threads) alive after destroy_process_group."""
    doomed = {id(g) for g in groups}
    for key in [k for k, g in _GROUPS.items() if id(g) in doomed]:
        del _GROUPS[key]


@contextlib.contextmanager
def simulate():
    """Run graphs without process groups (shape checks on fake tensors): collectives keep
    shapes right but not values. Only analysis passes use this."""
    previous = getattr(_SIMULATE, "on", False)
    _SIMULATE.on = True
    try:
        yield
    finally:
        _SIMULATE.on = previous


# torch 2.13 renames all_gather_into_tensor / reduce_scatter_tensor to *_single and warns (a
# FutureWarning per rank) on the old names; older torch (2.11 on the GPU machine) has only the old
# ones. Looked up on torch.distributed at each call: latency.inject patches the module's names.
_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


def all_gather_single(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """torch.distributed's flat all-gather under this torch's name for it."""
    return getattr(dist, _GATHER)(out, x, group=group, async_op=async_op)


def reduce_scatter_single(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """torch.distributed's flat reduce-scatter (a sum) under this torch's name for it."""
    return getattr(dist, _SCATTER)(out, x, group=group, async_op=async_op)


def _group(key: str) -> dist.ProcessGroup | None:
    if getattr(_SIMULATE, "on", False):
        return None
    if key not in _GROUPS:
        raise RuntimeError(f"pcompile: collective on group {key!r} but no process group is bound to it; "
                           "run the graph through a compiled model (pcompile.compile) under torch.distributed")
    return _GROUPS[key]


def _all_reduce(x: torch.Tensor, key: str) -> torch.Tensor:
    group = _group(key)
    if group is None:
        return x.clone()
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _all_gather(x: torch.Tensor, dim: int, key: str, size: int) -> torch.Tensor:
    group = _group(key)
    if group is None:
        return torch.cat([x] * size, dim=dim)
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _local_chunk(x: torch.Tensor, dim: int, key: str, size: int) -> torch.Tensor:
    group = _group(key)
    rank = 0 if group is None else dist.get_rank(group)
    return x.chunk(size, dim=dim)[rank].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, key: str, size: int) -> torch.Tensor:
    group = _group(key)
    if group is None:
        return _local_chunk(x, dim, key, size)
    # The collective scatters along dim 0: move `dim` there and back.
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // size,) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, moved, group)
    return out.movedim(0, dim).contiguous()


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key, size):
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.key), None, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key, size):
        return _all_reduce(x, key)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _BatchStatistic(torch.autograd.Function):
    """A statistic over the batch (passes/batch_statistics.py): each rank's statistic of its part
    -> the whole batch's (the mean of the parts' means, or the sum of their sums). Backward: every
    rank computes the same loss term from it and the dp averaging of gradients divides by the
    group size, so a mean's gradient passes unchanged and a sum's is multiplied by the size."""

    @staticmethod
    def forward(ctx, x, kind, key, size):
        ctx.scale = 1.0 if kind == "mean" else float(size)
        out = _all_reduce(x, key)
        return out / size if kind == "mean" else out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale if ctx.scale != 1.0 else grad, None, None, None


def _dim_pair(name: str, forward, backward) -> type:
    """An autograd Function over (x, dim, key, size) running collective `forward` and, on the
    gradient, its conjugate `backward` (the four sharded-dim pairs below differ only in these)."""
    def fwd(ctx, x, dim, key, size):
        ctx.dim, ctx.key, ctx.size = dim, key, size
        return forward(x, dim, key, size)

    def bwd(ctx, grad):
        return backward(grad, ctx.dim, ctx.key, ctx.size), None, None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_Gather = _dim_pair("_Gather", _all_gather, _local_chunk)
_Scatter = _dim_pair("_Scatter", _local_chunk, _all_gather)
_SpGather = _dim_pair("_SpGather", _all_gather, _reduce_scatter)
_SpReduceScatter = _dim_pair("_SpReduceScatter", _reduce_scatter, _all_gather)


@ops.collective(axis_arg=2)
def batch_statistic(x: torch.Tensor, kind: str, axis: str, size: int) -> torch.Tensor:
    """The whole batch's statistic ("mean" or "sum") from this rank's part's, over `axis`."""
    return _BatchStatistic.apply(x, kind, axis, size)


@ops.collective(axis_arg=1)
def tp_copy(x: torch.Tensor, axis: str, size: int) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient backward."""
    return _Copy.apply(x, axis, size)


@ops.collective(axis_arg=1)
def tp_reduce(x: torch.Tensor, axis: str, size: int) -> torch.Tensor:
    """Leave a tensor-parallel region: all-reduce the partial sums forward, identity backward."""
    return _Reduce.apply(x, axis, size)


@ops.collective(axis_arg=2)
def tp_gather(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Sharded along `dim` -> replicated: all-gather forward, keep the local chunk backward."""
    return _Gather.apply(x, dim, axis, size)


@ops.collective(axis_arg=2)
def tp_scatter(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Replicated -> sharded along `dim`: local chunk forward, all-gather backward."""
    return _Scatter.apply(x, dim, axis, size)


@ops.collective(axis_arg=2)
def sp_split(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Replicated -> this rank's sequence chunk: local chunk forward, all-gather backward."""
    return _Scatter.apply(x, dim, axis, size)


@ops.collective(axis_arg=2)
def sp_gather(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Sequence chunks -> the full input of column-parallel Linears: all-gather forward,
    reduce-scatter of the (partial) gradient backward."""
    return _SpGather.apply(x, dim, axis, size)


@ops.collective(axis_arg=2)
def sp_reduce_scatter(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Partial sums of row-parallel Linears -> this rank's sequence chunk of their sum:
    reduce-scatter forward, all-gather backward."""
    return _SpReduceScatter.apply(x, dim, axis, size)


@ops.collective(axis_arg=2)
def sp_unsplit(x: torch.Tensor, dim: int, axis: str, size: int) -> torch.Tensor:
    """Sequence chunks -> the full tensor for replicated code: all-gather forward, keep this
    rank's chunk of the (full, replicated) gradient backward."""
    return _Gather.apply(x, dim, axis, size)


@ops.local
def global_size(x: torch.Tensor, dim: int, size: int, *index: int):
    """`x.shape` / `x.size(i)` of the full tensor when `x` holds a 1/size shard along `dim`."""
    shape = list(x.shape)
    shape[dim] *= size
    full = torch.Size(shape)
    return full[index[0]] if index else full

