"""The rank layout: which global ranks form each group of a mesh axis, and a rank's coordinate
on it. One source for every layer: the cost model prices collectives on these groups, the
backends build their process groups (and DeviceMeshes) from them, the ONNX export writes them
into its nodes and the profiler times collectives on them.

Ranks are numbered pp outermost, then dp, tp innermost:

    rank = (p * dp + d) * tp + t

so a tp group is `tp` consecutive ranks (inside a node whenever tp <= devices per node), a dp
group is ranks `tp` apart, and pipeline stage p owns [p * dp * tp, (p + 1) * dp * tp).

Axes are named by strings in the rewritten graph (the backend binds each name to this rank's
process group); `Axis` is their typed form, `Axis.parse` / `Axis.name` the one conversion:
  "tp" / "dp" / "pp"  the plan's default mesh (the degrees of its default strategy)
  "tp{k}"             a layer at another tp: groups of k consecutive ranks
  "dp{d}"             a layer at another dp: the dp axis of the (d, N/d) mesh, ranks N/d apart
  "batch{c}:{f}"      the ranks that regroup the batch between dp = c and dp = f
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pcompile.errors import PcompileError

DEFAULT_AXES = ("pp", "dp", "tp")
_DEGREE = re.compile(r"^(tp|dp)(\d+)$")
_BATCH = re.compile(r"^batch(\d+):(\d+)$")


@dataclass(frozen=True)
class Axis:
    """A mesh axis: kind "tp" | "dp" | "pp" | "batch"; `size` its degree (0: the default mesh's
    axis of that kind, whatever its degree); `coarse` the coarser dp of a batch axis."""

    kind: str
    size: int = 0
    coarse: int = 0

    @property
    def name(self) -> str:
        if self.kind == "batch":
            return f"batch{self.coarse}:{self.size}"
        return self.kind if self.size == 0 else f"{self.kind}{self.size}"

    @staticmethod
    def parse(name) -> "Axis | None":
        """The axis a graph argument names, or None when it names none."""
        if not isinstance(name, str):
            return None
        if name in DEFAULT_AXES:
            return Axis(name)
        if match := _DEGREE.match(name):
            return Axis(match.group(1), int(match.group(2)))
        if match := _BATCH.match(name):
            return Axis("batch", int(match.group(2)), int(match.group(1)))
        return None

    @staticmethod
    def of_degree(kind: str, size: int, default: int) -> "Axis":
        """The default mesh's axis when `size` is its degree, else the degree-named one."""
        return Axis(kind) if size == default else Axis(kind, size)

    @staticmethod
    def regroup(coarse: int, fine: int) -> "Axis":
        """The axis of the groups that move the batch between dp = coarse and dp = fine."""
        return Axis("batch", fine, coarse)


def stage_groups(first: int, dp: int, tp: int) -> tuple[list[list[int]], list[list[int]]]:
    """(tp groups, dp groups) of a stage of dp * tp ranks starting at rank `first`."""
    tp_groups = [[first + d * tp + t for t in range(tp)] for d in range(dp)]
    dp_groups = [[first + d * tp + t for d in range(dp)] for t in range(tp)]
    return tp_groups, dp_groups


def regroup_groups(devices: int, coarse: int, fine: int, first: int = 0) -> list[list[int]]:
    """The groups of fine // coarse ranks that hold the pieces of one coarse batch part at the
    same position of their fine-dp layer's tp group: ranks devices // fine apart (in a stage of
    `devices` ranks from `first`). With tp innermost the finer split nests inside the coarser."""
    stride, size = devices // fine, fine // coarse
    bases = [r for r in range(devices) if (r // stride) % size == 0]
    return [[first + base + j * stride for j in range(size)] for base in bases]


def axis_groups(axis: Axis | str, world: int, dp: int = 0, tp: int = 0, pp: int = 1) -> list[list[int]]:
    """Every group of `axis` over `world` ranks, as lists of global ranks; the default mesh's
    axes ("dp", "tp", "pp") need the plan's default degrees."""
    axis = Axis.parse(axis) if isinstance(axis, str) else axis
    if axis is None:
        raise PcompileError("a graph names a mesh axis no mesh provides", "this is a pcompile bug; please report it")
    if axis.kind == "batch":
        return regroup_groups(world, axis.coarse, axis.size)
    if axis.size == 0:  # the default (pp, dp, tp) mesh
        if pp * dp * tp != world:
            raise PcompileError(f"a (pp={pp}, dp={dp}, tp={tp}) mesh does not cover {world} ranks",
                                "re-plan for this number of ranks")
        stage = dp * tp
        if axis.kind == "pp":
            return [[p * stage + r for p in range(pp)] for r in range(stage)]
        per_stage = [stage_groups(p * stage, dp, tp) for p in range(pp)]
        return [g for groups in per_stage for g in groups[0 if axis.kind == "tp" else 1]]
    if world % axis.size:
        raise PcompileError(f"axis {axis.name!r} needs a multiple of {axis.size} ranks, {world} are running",
                            "re-plan for this number of ranks")
    if axis.kind == "tp":
        return stage_groups(0, world // axis.size, axis.size)[0]
    return stage_groups(0, axis.size, world // axis.size)[1]


def group_of(rank: int, axis: Axis | str, world: int, dp: int = 0, tp: int = 0, pp: int = 1) -> list[int]:
    """The ranks of `rank`'s group on `axis`."""
    return next(g for g in axis_groups(axis, world, dp, tp, pp) if rank in g)


def coordinate(rank: int, axis: Axis | str, world: int, dp: int = 0, tp: int = 0, pp: int = 1) -> int:
    """`rank`'s index in its group on `axis`."""
    return group_of(rank, axis, world, dp, tp, pp).index(rank)


def rank_grid(pp: int, dp: int, tp: int) -> list[list[list[int]]]:
    """The global rank at each (p, d, t): the array a (pp, dp, tp) DeviceMesh is built from."""
    return [[[(p * dp + d) * tp + t for t in range(tp)] for d in range(dp)] for p in range(pp)]


def contiguous_groups(world: int, size: int) -> list[list[int]]:
    """The world split into consecutive groups of `size` ranks (the tp groups of a tp = size mesh)."""
    return axis_groups(Axis("tp", size), world)
