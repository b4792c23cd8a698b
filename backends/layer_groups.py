"""The backend's part of plans whose layers use different (dp, tp) groupings (passes/reshard.py):
the process groups of every axis the rewritten IR names, the input batch split by the first
layer's dp, and gradients summed per parameter over its layer's dp group.

Axes, on N ranks numbered tp-innermost (the default mesh's "dp" / "tp" are built by the
backend as before):
  "tp{k}":        groups of k consecutive ranks (rank r in group r // k, coordinate r % k);
  "dp{d}":        the dp axis of the (d, N/d) mesh: ranks equal modulo N/d (coordinate r // (N/d));
  "batch{c}:{f}": the ranks that regroup the batch between dp = c and dp = f (pcompile.runtime.batch_regroup).

Gradient scaling: each rank's backward differentiates the sum of the last layer's part losses
(the serial loss is their mean over `loss_dp` parts), so a replicated parameter's gradient is
the sum over its dp group / loss_dp; an sdp parameter's reduce-scatter already divided by its
own dp, so it is multiplied by dp / loss_dp. The loss is the mean of the parts over the last
layer's dp group.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pcompile.runtime import batch_regroup, sdp
from pcompile.errors import PcompileError
from pcompile.passes.reshard import LAYOUT_KEY, MixedLayout, runtime_op

_DEGREE_AXIS = re.compile(r"^(tp|dp)(\d+)$")


def layout_of(ir) -> MixedLayout | None:
    """The mixed layout the reshard pass recorded (None: one grouping for every layer)."""
    return ir.gm.meta.get(LAYOUT_KEY)


def axis_groups(axis: str, world: int) -> list[list[int]]:
    """Every group of the named axis, as lists of global ranks."""
    match = _DEGREE_AXIS.match(axis)
    if match:
        kind, size = match.group(1), int(match.group(2))
        if world % size:
            raise PcompileError(f"axis {axis!r} needs a multiple of {size} ranks, {world} are running",
                                "re-plan for this number of ranks")
        if kind == "tp":
            return [[g * size + i for i in range(size)] for g in range(world // size)]
        inner = world // size
        return [[c + j * inner for j in range(size)] for c in range(inner)]
    pair = batch_regroup.parse_axis(axis)
    if pair is None:
        raise PcompileError(f"the IR names mesh axis {axis!r}, which no backend mesh provides",
                            "this is a pcompile bug; please report it")
    return batch_regroup.reshard_groups(world, *pair)


def _is_axis(name) -> bool:
    return isinstance(name, str) and (name in ("dp", "tp") or _DEGREE_AXIS.match(name) is not None
                                      or batch_regroup.parse_axis(name) is not None)


def _used_axes(ir, layout: MixedLayout) -> set[str]:
    """The axes the IR's run-time ops, parameter shardings and gradient syncs name."""
    axes = {layout.input_axis, layout.loss_axis} | {axis for axis, _ in layout.param_axes.values()}
    axes |= {s.axis for s in ir.param_shardings.values()} | {s.axis for s in sdp.param_shardings(ir.gm).values()}
    for module in ir.gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if runtime_op(node):
                    axes |= {a for a in node.args if _is_axis(a)}
    return axes


def add_axes(ir, groups: dict, coords: dict) -> None:
    """Collective on every rank: create the process groups of the IR's axes beyond the default
    mesh's, in one order on every rank; add this rank's group and coordinate of each."""
    layout = layout_of(ir)
    if layout is None:
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    for axis in sorted(_used_axes(ir, layout) - set(groups)):
        for ranks in axis_groups(axis, world):
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                groups[axis], coords[axis] = group, ranks.index(rank)


def local_batch(layout: MixedLayout, coords: dict, inputs: tuple) -> tuple:
    """This rank's part of every batched input: the first layer's dp split."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and layout.input_dp > 1:
            if x.shape[0] % layout.input_dp:
                raise PcompileError(f"batch of {x.shape[0]} is not divisible by dp={layout.input_dp}",
                                    f"use a global batch that is a multiple of {layout.input_dp}")
            x = x.chunk(layout.input_dp)[coords[layout.input_axis]]
        out.append(x)
    return tuple(out)


def sync_grads(layout: MixedLayout, named_parameters, sdp_names, groups: dict) -> None:
    """Exact gradients: sum each replicated parameter's over its dp group (one all-reduce per axis
    and dtype), then divide by the number of loss parts; rescale the sdp ones (see the module doc)."""
    buckets: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
    for name, p in named_parameters:
        if p.grad is None:
            continue
        axis, dp = layout.param_axes[name]
        if name in sdp_names:
            if dp != layout.loss_dp:
                p.grad.mul_(dp / layout.loss_dp)
            continue
        buckets.setdefault((axis, p.grad.dtype), []).append(p.grad)
    for (axis, _), grads in sorted(buckets.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        flat = _flatten_dense_tensors(grads)
        if groups.get(axis) is not None:
            dist.all_reduce(flat, group=groups[axis])
        if layout.loss_dp > 1:
            flat.div_(layout.loss_dp)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def global_loss(layout: MixedLayout, loss: torch.Tensor, groups: dict) -> torch.Tensor:
    """The mean of the last layer's part losses (collective over its dp group)."""
    loss = loss.detach().float().clone()
    if layout.loss_dp > 1:
        dist.all_reduce(loss, group=groups[layout.loss_axis])
        loss /= layout.loss_dp
    return loss
