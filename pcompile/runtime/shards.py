"""Split parameters at run time, one function each way: `take_shards` keeps this rank's chunk
of every split parameter (tensor parallelism's, then ZeRO-3's of the tp shard), once per
tensor and under every name it has, in one module or in several that share parameters
(pipeline stages on one rank); `gather_shards` rebuilds a full tensor from every rank's chunk."""
from __future__ import annotations

import torch
import torch.distributed as dist

from pcompile.ir.placement import Shard


def _set(root: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    path, _, attr = name.rpartition(".")
    setattr(root.get_submodule(path) if path else root, attr, value)


def take_shards(modules: list[torch.nn.Module], shardings: dict[str, Shard], coords: dict[str, int]) -> set[int]:
    """Replace every split parameter of `modules` by this rank's chunk (a contiguous copy):
    one chunk per tensor, set under every name any of the modules holds it by, so tied weights
    (a GPT's embedding and LM head) and a parameter shared by two stages stay one parameter.
    `shardings` may name a tensor by any of its names; names no module holds are skipped.
    Returns the ids of the new chunks."""
    chunks: dict[int, torch.nn.Parameter] = {}
    named = [(module, list(module.named_parameters(remove_duplicate=False))) for module in modules]
    for _, params in named:
        for name, full in params:
            if name in shardings and id(full) not in chunks:
                shard = shardings[name]
                local = shard.chunk(full.detach(), coords[shard.axis]).clone(memory_format=torch.contiguous_format)
                chunks[id(full)] = torch.nn.Parameter(local, requires_grad=full.requires_grad)
    for module, params in named:
        for name, full in params:
            if id(full) in chunks:
                _set(module, name, chunks[id(full)])
    return {id(chunk) for chunk in chunks.values()}


def gather_shards(local: torch.Tensor, shard: Shard | None, group) -> torch.Tensor:
    """Collective over `group` (the shard's axis): the full tensor from every rank's chunk (a
    detached copy when unsplit)."""
    if shard is None or shard.size == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local, memory_format=torch.contiguous_format) for _ in range(shard.size)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return shard.join(parts)
