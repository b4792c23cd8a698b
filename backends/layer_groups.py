"""The backend's part of plans whose layers use different (dp, tp) groupings (passes/reshard.py):
the process groups of every axis the rewritten IR names, the input batch split by the first
layer's dp, and gradients summed per parameter over its layer's dp group.

Axes beyond the default mesh's "dp" / "tp" ("tp{k}", "dp{d}", "batch{c}:{f}") get their
groups from the rank layout, pcompile.mesh.axis_groups; in a pipeline, those of each stage's
ranks (stage_axis_groups).

Gradient scaling: each rank's backward differentiates the sum of the last layer's part losses
(the serial loss is their mean over `loss_dp` parts), so a replicated parameter's gradient is
the sum over its dp group / loss_dp; an sdp parameter's reduce-scatter already divided by its
own dp, so it is multiplied by dp / loss_dp. The loss is the mean of the parts over the last
layer's dp group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pcompile.backends import expert_groups
from pcompile.errors import PcompileError
from pcompile.ir import MixedLayout
from pcompile.mesh import Axis, axis_groups
from pcompile.runtime import ops


def _used_axes(ir, layout: MixedLayout) -> set[str]:
    """The axes the IR's collectives, parameter shardings and gradient syncs name."""
    axes = {layout.input_axis, layout.loss_axis} | {axis for axis, _ in layout.param_axes.values()}
    axes |= {s.axis for s in ir.param_shardings.values()} | {s.axis for s in ir.sdp_shardings.values()}
    axes |= {ops.axis_of(node)[0] for _, node in ops.collectives_of(ir.gm)}
    return {axis for axis in axes if Axis.parse(axis) is not None}


def add_axes(ir, groups: dict, coords: dict) -> None:
    """Collective on every rank: create the process groups of the IR's axes beyond the default
    mesh's, in one order on every rank; add this rank's group and coordinate of each (the
    expert-parallel groups too: backends/expert_groups.py)."""
    expert_groups.add_expert_axes(ir, groups, coords)
    add_stage_axes(ir, groups, coords, 1)


def stage_axis_groups(axis: str, world: int, pp: int) -> list[list[int]]:
    """Every group of a degree-named or batch axis when `world` ranks run `pp` pipeline stages:
    in each stage, the groups the flat layout of its world / pp ranks has (a layer's grouping
    is one of its stage's ranks; pp rank p holds ranks [p * world / pp, (p + 1) * world / pp))."""
    size = world // pp
    return [[p * size + r for r in ranks] for p in range(pp) for ranks in axis_groups(axis, size)]


def add_stage_axes(ir, groups: dict, coords: dict, pp: int) -> list[str]:
    """Collective on every rank: the groups of the IR's mixed-layout axes beyond the default
    mesh's (stage_axis_groups), in one order on every rank; this rank's group and coordinate of
    each added to `groups` / `coords`. Returns the axes added."""
    layout = ir.mixed_layout
    if layout is None:
        return []
    world, rank = dist.get_world_size(), dist.get_rank()
    added = sorted(_used_axes(ir, layout) - set(groups))
    for axis in added:
        for ranks in stage_axis_groups(axis, world, pp):
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                groups[axis], coords[axis] = group, ranks.index(rank)
    return added


def batch_group(layout: MixedLayout, groups: dict):
    """The ranks that split the batch at the first layer (sum the step's loss counts), or None."""
    return groups.get(layout.input_axis) if layout.input_dp > 1 else None


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
