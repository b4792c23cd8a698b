"""The backend's part of expert parallelism (passes/expert_parallel.py): the process groups of
the "ep" axis the rewritten IR's `expert_mixture` nodes name. An ep group is `ep` consecutive
ranks of one data-parallel group (one tp coordinate): dp coordinates a*ep .. (a+1)*ep - 1.
Gradients need nothing of their own here: every rank holds every expert, the ranks not
computing an expert have a zero gradient for it, and the dp averaging (sum over dp / dp) gives
the serial gradient (the pass's docstring)."""
from __future__ import annotations

import torch.distributed as dist

from pcompile.mesh import rank_grid
from pcompile.runtime import expert_parallel, ops

AXIS = "ep"


def ep_degree(gm) -> int:
    """The ep degree the graph's expert mixtures use (1 when none)."""
    sizes = {node.args[5] for _, node in ops.collectives_of(gm)
             if ops.op_of(node).fn is expert_parallel.expert_mixture}
    return sizes.pop() if sizes else 1


def add_expert_axes(ir, groups: dict, coords: dict) -> None:
    """Collective on every rank: the ep groups of every dp group, created in one order on every
    rank; this rank's group and coordinate under "ep"."""
    ep = ep_degree(ir.gm)
    if ep == 1 or AXIS in groups:
        return
    dp, tp = dist.get_world_size(groups["dp"]), dist.get_world_size(groups["tp"])
    grid, rank = rank_grid(1, dp, tp)[0], dist.get_rank()
    for t in range(tp):
        for start in range(0, dp, ep):
            ranks = [grid[d][t] for d in range(start, start + ep)]
            group = dist.new_group(ranks)
            if rank in ranks:
                groups[AXIS], coords[AXIS] = group, ranks.index(rank)
