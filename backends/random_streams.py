"""The backends' part of random streams (pcompile.runtime.rng): each random op of a rank's
graphs is put in the stream of its layer's batch split, its pipeline stage and the tp axis
its input is cut over; each stream is seeded from one base seed and this rank's coordinates
on those axes (the rank layout, pcompile.mesh), so ranks holding the same activation draw
the same mask and all others draw independent ones."""
from __future__ import annotations

import torch
import torch.distributed as dist

from pcompile.ir.graph import META_KEY
from pcompile.mesh import Axis, coordinate
from pcompile.plan import Plan
from pcompile.runtime import rng


def _data_axis(plan: Plan, mixed: bool):
    """node -> the axis its layer splits the batch over ("dp", or "dp{d}" for a layer at another dp)."""
    def of(node) -> str:
        if not mixed:
            return "dp"
        layer = getattr(node.meta.get(META_KEY), "layer", None)
        dp = plan.strategy_for(layer).dp if layer is not None else plan.default.dp
        return Axis.of_degree("dp", dp, plan.default.dp).name
    return of


def base_seed(device: torch.device) -> int:
    """Collective: rank 0's torch.initial_seed() (ranks seeded differently still agree)."""
    seed = torch.tensor([torch.initial_seed() & (2**62 - 1)], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(seed, src=0)
    return int(seed.item())


def bind(modules: list[torch.nn.Module], plan: Plan, device: torch.device, prefix: str,
         mixed: bool = False) -> rng.Streams:
    """Collective: put the random ops of `modules` (this rank's graphs) in their streams,
    seeded from rank 0's initial seed; returns the rank's streams (reseed with `reseed`)."""
    streams = rng.Streams(device)
    data_axis = _data_axis(plan, mixed)
    for module in modules:
        used = rng.bind_streams(module, prefix, lambda node: rng.stream_axes(node, data_axis(node), plan.pp > 1))
        for axes in used:
            streams.add(",".join(axes), 0)
    rng.register(prefix, streams)
    reseed(streams, plan, base_seed(device))
    return streams


def stream_coordinate(rank: int, axis: str, world: int, plan: Plan) -> int:
    """`rank`'s coordinate on a stream's axis. A degree-named or batch axis ("dp4", "tp2",
    "batch2:4") groups the ranks of one pipeline stage (passes/reshard.py), so its coordinate is
    the stage-local one: over all ranks, ranks of one stage holding different batch parts would
    share it (and draw the same masks)."""
    parsed = Axis.parse(axis)
    if parsed is not None and parsed.kind != "pp" and (parsed.size or parsed.kind == "batch"):
        stage = world // plan.pp
        return coordinate(rank % stage, axis, stage)
    return coordinate(rank, axis, world, plan.default.dp, plan.default.tp, plan.pp)


def reseed(streams: rng.Streams, plan: Plan, seed: int) -> None:
    """Every stream of this rank from `seed` (the same on every rank)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0

    def coordinates(key: str) -> tuple[tuple[str, int], ...]:
        return tuple((axis, stream_coordinate(rank, axis, world, plan) if world > 1 else 0) for axis in key.split(","))
    streams.reseed(seed, coordinates)
