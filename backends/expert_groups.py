"""The backend's part of expert parallelism (passes/expert_parallel.py): the process groups of
the "ep" axis the rewritten IR's `expert_mixture` nodes name. An ep group is `ep` consecutive
ranks of one data-parallel group (one tp coordinate): dp coordinates a*ep .. (a+1)*ep - 1.
Each rank holds its own experts only (ExpertStorage): their gradients are summed over the
ranks holding the same experts and divided by dp, not averaged over dp (the pass's docstring).
Each MoE layer's placement (pcompile.runtime.expert_placement) can change between steps
(FlexMoE's rebalancing, backends/expert_rebalance.py): experts moved, hot ones replicated on
several ranks of the ep group; every ep group of the dp group uses the same placement.
Batched expert weights (HF Mixtral: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) are held
as stacked rows: a rank's local tensor has one row per expert it holds, in its slot order, so
the static placement's rows are exactly the "ep" Shard of param_shardings (the chunk
r*E/ep ..) and a rebalancing re-stacks them (ExpertStorage.restacked: names whose rows no
longer are that chunk; full tensors, checkpoints and the gradient norm then read the rows by
the placement instead of the Shard)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist

from pcompile.errors import PcompileError
from pcompile.ir.placement import local_shape
from pcompile.mesh import rank_grid
from pcompile.runtime import expert_parallel, ops
from pcompile.runtime.expert_placement import ExpertPlacement

AXIS = "ep"
EDP = "edp"  # the ranks holding the same experts: one per ep group of the dp group
EXPERT_PARAMS = "pcompile_expert_params"  # node.meta key set by passes/expert_parallel.py


MIXTURES = (expert_parallel.expert_mixture, expert_parallel.gated_expert_mixture)
_ROUTE_IDS = itertools.count()


@dataclass(frozen=True)
class ExpertLayer:
    """One expert mixture of the graph: its module path (e.g. blocks.0.moe), each expert's
    parameter names (the modules form; () for batched weights, `gated`) and its routing key."""

    name: str
    experts: tuple[tuple[str, ...], ...]
    num_experts: int
    gated: bool
    route: str
    stacked: tuple[str, ...] = ()  # batched weights (gated): the stacked parameters' names, row e = expert e
    tp_split: bool = False  # expert tensor parallelism: each expert's Linears split over tp

    @property
    def params(self) -> tuple[str, ...]:
        return self.stacked + tuple(name for names in self.experts for name in names)


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
    chunks taken and gathered as tensor parallelism's), synced as the owned experts are; after a
    rebalancing their rows are re-stacked per the placement (`restacked`, the module docstring)."""

    def __init__(self, owner: dict[str, int], ep: int, groups: dict, coords: dict, shapes: dict,
                 chunked: frozenset = frozenset(), layers: tuple = ()):
        self.ep, self.shapes, self.chunked, self.layers = ep, shapes, chunked, layers
        self.group, self.coord, self.edp = groups[AXIS], coords[AXIS], groups.get(EDP)
        self.groups = groups
        self.holders = {name: (c,) for name, c in owner.items()}  # the ep coordinates holding each
        # the ep coordinate an expert's full tensor is read from (its first holder), and what this
        # rank holds: kept with `holders` (full_state_dict asks per parameter)
        self.owner = dict(owner)
        self.held = self._held()
        self.routes = {layer.name: expert_parallel.Routing(ExpertPlacement.static(layer.num_experts, ep))
                       for layer in layers}
        # expert tensor parallelism: out's bias added by tp coordinate 0 only (passes/expert_parallel.py)
        # and its gradient summed over tp (the other coordinates' is zero) so every copy steps alike
        self.tp_split = any(layer.tp_split for layer in layers)
        self._tp_biases = {names[3] for layer in layers if layer.tp_split for names in layer.experts if len(names) == 4}
        for layer in layers:
            self.routes[layer.name].adds_bias = not layer.tp_split or coords.get("tp", 0) == 0
        for layer in layers:
            expert_parallel.bind_routing(layer.route, self.routes[layer.name])
        self.names = set(owner) | set(chunked)  # every expert parameter: none is averaged over dp
        self.stacked_layer = {name: layer for layer in layers for name in layer.stacked}
        self.restacked: set[str] = set()  # stacked weights whose rows follow a non-static placement
        self._named: list = []
        self._params: list = []  # (leaf, holder of .grad), held
        self._remote: list = []  # holders of the experts held elsewhere
        self._active = False

    def _held(self) -> set[str]:
        return {name for name, held in self.holders.items() if self.coord in held} | set(self.chunked)

    def pieces(self, name: str) -> int | Fraction:
        """How many distinct pieces the ranks hold of parameter `name` (for the gradient norm:
        world // pieces ranks hold each piece); an expert with m replicas per ep group: ep / m."""
        return Fraction(self.ep, len(self.holders[name])) if name in self.holders else 1

    def close(self) -> None:
        for layer in self.layers:
            expert_parallel.unbind_routing(layer.route)

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
        """`named`: (name, leaf parameter, the tensor whose .grad is averaged) of this rank (again
        after a rebalancing: the holders changed, the parameter objects did not)."""
        held = self.held = self._held()
        self._named = named
        self._params = [(name, holder) for name, leaf, holder in named if name in held]
        self._remote = [holder for name, _, holder in named if name in self.names and name not in held]

    def begin(self, sync: bool) -> None:
        self._active = sync

    def finish(self, divisor: int) -> None:
        """After backward: owned experts' gradients summed over their replicas, divided by
        `divisor` (dp); the remote experts get empty gradients (so every rank takes part in the
        collectives that read gradients, e.g. full_grads)."""
        if not self._active:
            return
        for _, holder in self._params:
            if holder.grad is None:  # no token reached it on any rank of the group this step
                holder.grad = torch.zeros_like(holder)
            if self.edp is not None:  # the same coordinate holds the same experts in every ep group
                dist.all_reduce(holder.grad, group=self.edp)
        biases = [holder.grad for name, holder in self._params if name in self._tp_biases]
        if biases:  # etp: added (and differentiated) on tp coordinate 0 only
            flat = torch.cat([g.reshape(-1) for g in biases])
            dist.all_reduce(flat, group=self.groups["tp"])
            for g, part in zip(biases, flat.split([g.numel() for g in biases])):
                g.copy_(part.view_as(g))
        self._sum_replicas()
        for _, holder in self._params:
            holder.grad.div_(divisor)
        for holder in self._remote:
            if holder.grad is None:
                holder.grad = torch.zeros_like(holder)
        self._active = False

    def _sum_replicas(self) -> None:
        """A replicated expert's holders each computed its gradient from their part of its rows:
        summed over them (one all-reduce over the ep group of every replicated expert's
        gradients - whole parameters, or its row of stacked weights - zeros from the ranks not
        holding it), so every replica steps the same."""
        grads = dict((name, holder.grad) for name, holder in self._params)
        pieces = [(_numel(self.shapes[name]), grads.get(name))
                  for name, held in self.holders.items() if len(held) > 1]
        for layer in self.layers:
            placement = self.routes[layer.name].placement
            rows = {e: j for j, e in enumerate(placement.slots(self.coord))}
            for e, held in enumerate(placement.holders if layer.stacked else ()):
                if len(held) > 1:
                    pieces += [(_numel(self.shapes[name][1:]), grads[name][rows[e]] if e in rows else None)
                               for name in layer.stacked]
        if not pieces:
            return
        like = self._named[0][2]  # dtype and device of the gradients (a rank may hold no expert)
        flat = torch.cat([like.new_zeros(n) if grad is None else grad.reshape(-1) for n, grad in pieces])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for n, grad in pieces:
            if grad is not None:
                grad.copy_(flat[offset:offset + n].view_as(grad))
            offset += n

    def move(self, layer: ExpertLayer, placement: ExpertPlacement, state_of) -> None:
        """Collective over the ep group (every ep group moves alike): layer `layer`'s experts to
        `placement`. An expert gaining holders is broadcast from its first holder - its
        parameters and, per parameter, the optimizer state tensors `state_of(leaf)` names (a
        dict key -> tensor of the parameter's shape, e.g. AdamW's moments; the same keys on
        every rank) - into the parameter objects the optimizer steps (their .data replaced: the
        optimizer keeps its references); a rank that stops holding one keeps empty tensors.
        Gradients must be cleared first (backends/expert_rebalance.py checks)."""
        routing = self.routes[layer.name]
        leaves = {name: leaf for name, leaf, _ in self._named}
        if layer.stacked:
            self._restack(layer, placement, [(leaves[name], state_of(leaves[name])) for name in layer.stacked])
        for e, names in enumerate(layer.experts):
            before, after = routing.placement.holders[e], placement.holders[e]
            if before == after:
                continue
            pieces = [(leaves[name], state_of(leaves[name])) for name in names]
            if set(after) - set(before):
                tensors = [t for leaf, state in pieces for t in (leaf, *state.values())]
                if self.coord == before[0]:
                    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
                else:
                    sizes = [_numel(self.shapes[name]) * (1 + len(state)) for name, (_, state) in zip(names, pieces)]
                    flat = tensors[0].new_empty(sum(sizes))
                dist.broadcast(flat, src=dist.get_global_rank(self.group, before[0]), group=self.group)
                if self.coord in after and self.coord not in before:
                    offset = 0
                    for name, (leaf, state) in zip(names, pieces):
                        n, shape = _numel(self.shapes[name]), self.shapes[name]
                        leaf.data = flat[offset:offset + n].view(shape).clone()
                        offset += n
                        for key in state:
                            state[key].data = flat[offset:offset + n].view(shape).clone()
                            offset += n
            if self.coord in before and self.coord not in after:
                for leaf, state in pieces:
                    leaf.data = leaf.data.new_empty(0)
                    for key in state:
                        state[key].data = state[key].data.new_empty(0)
            for name in names:
                self.holders[name], self.owner[name] = after, after[0]
        routing.place(placement)
        self.attach(self._named)

    def _restack(self, layer: ExpertLayer, placement: ExpertPlacement, pieces: list) -> None:
        """move() for batched weights: each expert gaining holders has its rows (of every stacked
        parameter and of its optimizer states, `pieces`: (leaf, state dict)) broadcast from its
        first holder; then every tensor of a rank whose experts changed is re-stacked in its new
        slot order from its kept rows and the received ones (.data replaced, as in move())."""
        old = {e: j for j, e in enumerate(self.routes[layer.name].slots[self.coord])}
        new = placement.slots(self.coord)
        tensors = [(name, t) for name, (leaf, state) in zip(layer.stacked, pieces) for t in (leaf, *state.values())]
        sizes = [_numel(self.shapes[name][1:]) for name, _ in tensors]
        received = {}
        for e in range(layer.num_experts):
            before, after = self.routes[layer.name].placement.holders[e], placement.holders[e]
            if not set(after) - set(before):
                continue
            if self.coord == before[0]:
                flat = torch.cat([t.detach()[old[e]].reshape(-1) for _, t in tensors])
            else:
                flat = tensors[0][1].new_empty(sum(sizes))
            dist.broadcast(flat, src=dist.get_global_rank(self.group, before[0]), group=self.group)
            if e in new and e not in old:
                received[e] = flat.split(sizes)
        if tuple(old) != new:
            for i, (name, t) in enumerate(tensors):
                rows = [t.detach()[old[e]] if e in old else received[e][i].view(self.shapes[name][1:]) for e in new]
                t.data = torch.stack(rows) if rows else t.data.new_empty((0, *self.shapes[name][1:]))
        if placement == ExpertPlacement.static(layer.num_experts, self.ep):  # the Shard's chunk again
            self.restacked -= set(layer.stacked)
        else:
            self.restacked |= set(layer.stacked)

    def gathers(self, name: str) -> bool:
        """Whether `full` (not the param_shardings' gather) gives parameter `name`'s full tensor."""
        return name in self.owner or name in self.restacked

    def full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Collective over the ep group: the owner's tensor `name` (a parameter, its gradient or
        an optimizer state of its shape) on every rank; re-stacked weights: each expert's row
        from its first holder (summed with the others' zeros: exact)."""
        if name in self.restacked:
            placement = self.routes[self.stacked_layer[name].name].placement
            out = local.new_zeros(self.shapes[name])
            for j, e in enumerate(placement.slots(self.coord)):
                if placement.holders[e][0] == self.coord:
                    out[e] = local.detach()[j]
            dist.all_reduce(out, group=self.group)
            return out
        out = local.detach().clone() if self.coord in self.holders[name] else \
            torch.empty(self.shapes[name], dtype=local.dtype, device=local.device)
        dist.broadcast(out, src=dist.get_global_rank(self.group, self.holders[name][0]), group=self.group)
        return out

    def local_rows(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of re-stacked weight `name`'s full tensor (a checkpoint's value)."""
        slots = self.routes[self.stacked_layer[name].name].placement.slots(self.coord)
        return full[list(slots)]

    def norm_terms(self, name: str, grad: torch.Tensor, replicas: int) -> list[tuple[torch.Tensor, int]]:
        """(piece, ranks holding it) of a gradient for the global norm: a re-stacked weight's
        rows one by one, expert e's held by m_e times the `replicas` its "ep" Shard counts."""
        if name not in self.restacked:
            return [(grad, replicas)]
        placement = self.routes[self.stacked_layer[name].name].placement
        return [(grad[j], replicas * len(placement.holders[e])) for j, e in enumerate(placement.slots(self.coord))]


def _numel(shape: tuple) -> int:
    out = 1
    for size in shape:
        out *= size
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


def _mixtures(gm):
    """(module, node, expert parameter names) of every expert mixture in `gm` and its nested
    GraphModules (checkpoint regions, pipeline stages)."""
    for module, node in ops.collectives_of(gm):
        fn = ops.op_of(node).fn
        if fn not in MIXTURES:
            continue
        # the names the rewrite recorded (inside a checkpoint region the parameters come in as inputs)
        first = 7 if fn is expert_parallel.gated_expert_mixture else 8
        yield module, node, tuple(node.meta.get(EXPERT_PARAMS) or [str(read.target) for read in node.args[first:]])


def expert_owners(gm) -> tuple[dict[str, int], frozenset]:
    """(expert parameter name -> the ep coordinate that owns it, from the expert mixtures' args;
    the batched expert weights the gated mixtures read, split over ep)."""
    owner, chunked = {}, set()
    for _, node, names in _mixtures(gm):
        if ops.op_of(node).fn is expert_parallel.gated_expert_mixture:
            chunked.update(names)
            continue
        ep, experts, bias = node.args[5], node.args[6], node.args[7]
        step, per = (4 if bias else 2), experts // ep
        for i, name in enumerate(names):
            owner[name] = (i // step) // per
    return owner, frozenset(chunked)


def bind_routes(modules: list) -> tuple[ExpertLayer, ...]:
    """Each expert mixture of this rank's lowered `modules` told the key of its layer's Routing
    (a `route` keyword: the IR itself stays rank-generic); the layers, in graph order."""
    layers, touched = {}, set()
    for module in modules:
        for graph_module, node, names in _mixtures(module):
            gated = ops.op_of(node).fn is expert_parallel.gated_expert_mixture
            name = names[0].split(".experts.")[0] if ".experts." in names[0] else names[0].rpartition(".")[0]
            if name not in layers:
                step = 0 if gated else (4 if node.args[7] else 2)
                experts = () if gated else tuple(names[i:i + step] for i in range(0, len(names), step))
                layers[name] = ExpertLayer(name, experts, node.args[6], gated, f"pcompile-moe{next(_ROUTE_IDS)}/{name}",
                                           tuple(names) if gated else (), bool(node.kwargs.get("tp_split")))
            node.kwargs = {**node.kwargs, "route": layers[name].route}
            touched.add(graph_module)
    for graph_module in touched:
        graph_module.recompile()
    return tuple(layers.values())


def hold_local(gm, ir, groups: dict, coords: dict) -> ExpertStorage | None:
    """This rank's expert storage (None without expert parallelism): remote experts dropped from
    `gm` (a module, or a pipeline rank's list of stage modules), its mixtures bound to their
    layers' routings."""
    owner, chunked = expert_owners(ir.gm)
    if not (owner or chunked) or AXIS not in groups:
        return None
    modules = gm if isinstance(gm, list) else [gm]
    # full shapes; an expert's tp slice under etp (its param_shardings: the shape each holder has)
    shapes = {name: tuple(ir.gm.get_parameter(name).shape) for name in chunked}
    shapes.update({name: tuple(local_shape(ir.gm.get_parameter(name).shape, ir.param_shardings.get(name)))
                   for name in owner})
    storage = ExpertStorage(owner, ep_degree(ir.gm), groups, coords, shapes, chunked, bind_routes(modules))
    storage.drop_remote(modules)
    return storage


def with_sync(dense, storage: ExpertStorage, named: list, divisor: int) -> _Syncs:
    storage.attach(named)
    return _Syncs(dense, storage, divisor)


def refuse(storage: ExpertStorage | None, what: str) -> None:
    if storage is not None:
        raise PcompileError(f"{what} with expert parallelism (each rank holds only its experts) is not supported yet",
                            "use ep=1 for this (train under ep from weights the model was built with)")
