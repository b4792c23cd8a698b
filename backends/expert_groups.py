"""The backend's part of expert parallelism (passes/expert_parallel.py): the process groups of
the "ep" axis the rewritten IR's `expert_mixture` nodes name. An ep group is `ep` consecutive
ranks of one data-parallel group (one tp coordinate): dp coordinates a*ep .. (a+1)*ep - 1.
Each rank holds its own experts only (ExpertStorage): their gradients are summed over the
ranks holding the same experts and divided by dp, not averaged over dp (the pass's docstring)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from pcompile.errors import PcompileError
from pcompile.mesh import rank_grid
from pcompile.runtime import expert_parallel, ops

AXIS = "ep"
EDP = "edp"  # the ranks holding the same experts: one per ep group of the dp group
EXPERT_PARAMS = "pcompile_expert_params"  # node.meta key set by passes/expert_parallel.py


MIXTURES = (expert_parallel.expert_mixture, expert_parallel.gated_expert_mixture)


def ep_degree(gm) -> int:
    """The ep degree the graph's expert mixtures use (1 when none)."""
    sizes = {node.args[5] for _, node in ops.collectives_of(gm) if ops.op_of(node).fn in MIXTURES}
    return sizes.pop() if sizes else 1


def add_expert_axes(ir, groups: dict, coords: dict, pp: int = 1) -> None:
    """Collective on every rank: the ep groups of every dp group (of every pipeline stage when
    pp > 1), then (dp > ep) the groups of the ranks holding the same experts, created in one
    order on every rank; this rank's groups and coordinates under "ep" and "edp"."""
    ep = ep_degree(ir.gm)
    if ep == 1 or AXIS in groups:
        return
    dp, tp = dist.get_world_size(groups["dp"]), dist.get_world_size(groups["tp"])
    grids, rank = rank_grid(pp, dp, tp), dist.get_rank()
    for axis, blocks in ((AXIS, [range(start, start + ep) for start in range(0, dp, ep)]),
                         (EDP, [range(offset, dp, ep) for offset in range(ep)] if dp > ep else [])):
        for grid in grids:
            for t in range(tp):
                for block in blocks:
                    ranks = [grid[d][t] for d in block]
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        groups[axis], coords[axis] = group, ranks.index(rank)


class ExpertStorage:
    """This rank's experts only (holding E/ep of them, issue #18): every expert parameter the
    graph's expert mixtures read is owned by one ep coordinate (expert e by e // (E/ep)); the
    others are replaced by empty Parameters (their names stay, for the optimizer and the state
    dict's order). Gradients: the dp averaging skips the experts; `finish()` sums an owned
    expert's gradient over its replicas - the ranks of the same ep coordinate in the other ep
    groups of the dp group ("edp", dp/ep ranks; none when ep == dp) - and divides by dp (the
    pass's derivation: each owner holds sum over its ep group's parts of dL_r/dtheta, the serial
    gradient is (1/dp) sum over all parts). Full tensors are broadcast from the owner.
    `chunked`: batched expert weights split along the experts over ep (param_shardings: their
    chunks taken and gathered as tensor parallelism's), synced as the owned experts are."""

    def __init__(self, owner: dict[str, int], ep: int, groups: dict, coords: dict, shapes: dict,
                 chunked: frozenset = frozenset()):
        self.owner, self.ep, self.shapes, self.chunked = owner, ep, shapes, chunked
        self.group, self.coord, self.edp = groups[AXIS], coords[AXIS], groups.get(EDP)
        self.held = {name for name, c in owner.items() if c == self.coord} | set(chunked)
        self.names = set(owner) | set(chunked)  # every expert parameter: none is averaged over dp
        self._params: list = []  # (leaf, holder of .grad), owned
        self._remote: list = []  # holders of the experts held elsewhere
        self._active = False

    def pieces(self, name: str) -> int:
        """How many distinct pieces the ranks hold of parameter `name` (for the gradient norm)."""
        return self.ep if name in self.owner else 1

    def drop_remote(self, modules) -> None:
        """Replace the experts this rank does not own by empty Parameters (in every module of
        `modules` holding them: a pipeline rank's stages)."""
        for gm in modules:
            held = dict(gm.named_parameters(remove_duplicate=False))
            for name in self.owner:
                if name in self.held or name not in held:
                    continue
                path, _, attr = name.rpartition(".")
                module = gm.get_submodule(path)
                setattr(module, attr, torch.nn.Parameter(held[name].detach().new_empty(0),
                                                         requires_grad=held[name].requires_grad))

    def attach(self, named: list) -> None:
        """`named`: (name, leaf parameter, the tensor whose .grad is averaged) of this rank."""
        self._params = [(leaf, holder) for name, leaf, holder in named if name in self.held]
        self._remote = [holder for name, _, holder in named if name in self.names and name not in self.held]

    def begin(self, sync: bool) -> None:
        self._active = sync

    def finish(self, divisor: int) -> None:
        """After backward: owned experts' gradients summed over their replicas, divided by
        `divisor` (dp); the remote experts get empty gradients (so every rank takes part in the
        collectives that read gradients, e.g. full_grads)."""
        if not self._active:
            return
        for leaf, holder in self._params:
            if holder.grad is None:  # no token reached it on any rank of the group this step
                holder.grad = torch.zeros_like(holder)
            if self.edp is not None:
                dist.all_reduce(holder.grad, group=self.edp)
            holder.grad.div_(divisor)
        for holder in self._remote:
            if holder.grad is None:
                holder.grad = torch.zeros_like(holder)
        self._active = False

    def full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Collective over the ep group: the owner's tensor `name` (a parameter, its gradient or
        an optimizer state of its shape) on every rank."""
        out = local.detach().clone() if name in self.held else \
            torch.empty(self.shapes[name], dtype=local.dtype, device=local.device)
        dist.broadcast(out, src=dist.get_global_rank(self.group, self.owner[name]), group=self.group)
        return out


class _Syncs:
    """The dp averaging of the other parameters and the experts' own, as one sync."""

    def __init__(self, dense, experts: ExpertStorage, divisor: int):
        self.dense, self.experts, self.divisor = dense, experts, divisor

    def begin(self, sync: bool) -> None:
        if self.dense is not None:
            self.dense.begin(sync)
        self.experts.begin(sync)

    def finish(self) -> None:
        if self.dense is not None:
            self.dense.finish()
        self.experts.finish(self.divisor)

    def remove(self) -> None:
        if self.dense is not None:
            self.dense.remove()


def expert_owners(gm) -> tuple[dict[str, int], frozenset]:
    """(expert parameter name -> the ep coordinate that owns it, from the expert mixtures' args;
    the batched expert weights the gated mixtures read, split over ep)."""
    owner, chunked = {}, set()
    for _, node in ops.collectives_of(gm):
        fn = ops.op_of(node).fn
        # the names the rewrite recorded (inside a checkpoint region the parameters come in as inputs)
        first = 7 if fn is expert_parallel.gated_expert_mixture else 8
        names = node.meta.get(EXPERT_PARAMS) or [str(read.target) for read in node.args[first:]]
        if fn is expert_parallel.gated_expert_mixture:
            chunked.update(names)
        if fn is not expert_parallel.expert_mixture:
            continue
        ep, experts, bias = node.args[5], node.args[6], node.args[7]
        step, per = (4 if bias else 2), experts // ep
        for i, name in enumerate(names):
            owner[name] = (i // step) // per
    return owner, frozenset(chunked)


def hold_local(gm, ir, groups: dict, coords: dict) -> ExpertStorage | None:
    """This rank's expert storage (None without expert parallelism): remote experts dropped from
    `gm` (a module, or a pipeline rank's list of stage modules)."""
    owner, chunked = expert_owners(ir.gm)
    if not (owner or chunked) or AXIS not in groups:
        return None
    shapes = {name: tuple(ir.gm.get_parameter(name).shape) for name in owner}
    storage = ExpertStorage(owner, ep_degree(ir.gm), groups, coords, shapes, chunked)
    storage.drop_remote(gm if isinstance(gm, list) else [gm])
    return storage


def with_sync(dense, storage: ExpertStorage, named: list, divisor: int) -> _Syncs:
    storage.attach(named)
    return _Syncs(dense, storage, divisor)


def refuse(storage: ExpertStorage | None, what: str) -> None:
    if storage is not None:
        raise PcompileError(f"{what} with expert parallelism (each rank holds only its experts) is not supported yet",
                            "use ep=1 for this (train under ep from weights the model was built with)")
