"""How a tensor is laid out over the mesh, as small typed values (no strings to parse).

`Shard`: split into `size` equal chunks along `dim` over mesh axis `axis` (a parameter's
tensor-parallel or ZeRO-3 split, an activation's head, sequence or batch split).
`Placement`: a node's value on one rank: the shards that cut it (applied in order: a ZeRO-3
chunk of a tensor-parallel shard is two), or a partial sum over an axis (a row-parallel
Linear's output before its all-reduce), or neither (replicated). Its text is the IR dump's
sharding column: "R", "P@tp", "S(2)@tp", "S(1)@tp,S(0)@dp".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """A tensor split into `size` equal chunks along `dim` over mesh `axis`.

    With `blocks` > 1 the tensor is `blocks` equal blocks along `dim` (a fused projection:
    GPT-2's c_attn holds q, k and v side by side) and each block is chunked by `size`: rank r
    keeps the r-th chunk of every block, so its local q, k and v are again side by side."""

    axis: str
    dim: int
    size: int
    blocks: int = 1

    def chunk(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s part of the full tensor (a view when blocks == 1)."""
        if self.blocks == 1:
            return full.chunk(self.size, dim=self.dim)[rank]
        return torch.cat([block.chunk(self.size, dim=self.dim)[rank]
                          for block in full.chunk(self.blocks, dim=self.dim)], dim=self.dim)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's part, in rank order (inverse of `chunk`)."""
        if self.blocks == 1:
            return torch.cat(parts, dim=self.dim)
        per_rank = [part.chunk(self.blocks, dim=self.dim) for part in parts]
        return torch.cat([per_rank[r][b] for b in range(self.blocks) for r in range(len(parts))], dim=self.dim)

    def local_shape(self, shape) -> torch.Size:
        shape = list(shape)
        shape[self.dim] //= self.size
        return torch.Size(shape)

    def __str__(self) -> str:
        return f"S({self.dim})@{self.axis}"


def local_shape(shape, *shards: Shard | None) -> torch.Size:
    """`shape` cut by each shard in turn (None: not cut)."""
    shape = torch.Size(shape)
    for shard in shards:
        if shard is not None:
            shape = shard.local_shape(shape)
    return shape


@dataclass(frozen=True)
class Partial:
    """A partial sum over `axis`: the value is the sum of every rank's."""

    axis: str
    size: int

    def __str__(self) -> str:
        return f"P@{self.axis}"


@dataclass(frozen=True)
class Placement:
    """A node's value on one rank: cut by `shards` (in order), a `partial` sum, or replicated."""

    shards: tuple[Shard, ...] = ()
    partial: Partial | None = None

    @staticmethod
    def shard(dim: int, axis: str, size: int) -> "Placement":
        return Placement((Shard(axis, dim, size),))

    @staticmethod
    def partial_sum(axis: str, size: int) -> "Placement":
        return Placement(partial=Partial(axis, size))

    @staticmethod
    def of(*shards: Shard | None) -> "Placement":
        """The placement of a tensor cut by these shards (None entries: not cut)."""
        return Placement(tuple(s for s in shards if s is not None))

    @property
    def replicated(self) -> bool:
        return not self.shards and self.partial is None

    def local_shape(self, shape) -> torch.Size:
        return local_shape(shape, *self.shards)

    def with_axes(self, rename) -> "Placement":
        """The same placement with every axis renamed to `rename(axis, size)`."""
        shards = tuple(Shard(rename(s.axis, s.size), s.dim, s.size, s.blocks) for s in self.shards)
        partial = None if self.partial is None else Partial(rename(self.partial.axis, self.partial.size),
                                                             self.partial.size)
        return Placement(shards, partial)

    def __str__(self) -> str:
        if self.partial is not None:
            return str(self.partial)
        return ",".join(map(str, self.shards)) or "R"


REPLICATED = Placement()
