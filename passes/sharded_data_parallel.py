"""Rewrite: sharded data parallelism (ZeRO-3) for the layers whose strategy has sdp=True.

A parameter read by an sdp layer lives sharded over the "dp" mesh axis: each rank keeps a
1/dp chunk along one dim. Its reads become explicit graph collectives, per unit: an
`sdp_prefetch` node that issues the all-gather, placed right before the previous unit's first
op (so it runs while that unit computes: FSDP2's forward prefetch), and an `sdp_gather` node
naming it that waits for it (reduce-scatter averaged over dp backward, see
pcompile/runtime/sdp.py), placed right before the unit's first op, and a getitem per
parameter, freed after its last use. The prefetch stays next to its gather where the two
layers differ in dp (the unit object would cross a batch regrouping, which only moves
tensors) and with pp > 1 (pipeline_split re-creates parameter-only nodes in each stage at
first use anyway). A unit is a layer (one collective per layer and direction, as FSDP per
block), or one op in layers with operator splitting (split > 1): a weight the split reads as
k pieces (chunk along the input features) is sharded along another dim, so each piece is
gathered alone and only 1/k of the weight is materialised at a time.

The ops run through `sdp_module` (a leaf module, as a functional call with the gathered
parameters) or `sdp_function` / `sdp_method`, which keep autograd from holding gathered
weights until backward. They run plainly in checkpointed layers (checkpointing already frees
and recomputes what the layer saves, the gathers included: a gather whose prefetch lies
before the layer is marked `recomputed`, its recompute re-gathering forward's unit, which
backward prefetches) and in the last unit of forward: backward starts with it, so
re-gathering it would only cost time (FSDP2 likewise keeps its root unsharded between
forward and backward). Parameters keep their names in
gm.named_parameters(); `IR.sdp_shardings` records each one's Shard over dp (under every name),
applied after any tensor-parallel split.

A tied parameter read by an sdp layer and a dp layer is sharded (the dp layer gathers it
too). A parameter with no dim divisible by dp stays replicated and data parallel.
Ordering: after tensor_parallel and operator_split (it rewrites their Linears' reads), before
checkpoint and pipeline_split (they move the gathers into regions and stages). With pp > 1 a
unit never spans layers, so pipeline_split, which cuts at layer boundaries, keeps each gather
in the stage of its ops: every micro-batch gathers the unit and reduce-scatters its gradient,
the shards' .grad accumulating the micro-batches' chunks.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from pcompile.errors import PcompileError
from pcompile.ir import IR, Placement, Shard, local_shape
from pcompile.ir.params import by_tensor, under_every_name
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.runtime import ops, sdp

AXIS = "dp"


@dataclass(frozen=True)
class Read:
    """A parameter an op reads: whole, or `piece` = (k, dim, i), i.e. torch.chunk(param, k, dim)[i]
    (operator splitting reads a weight as k pieces: each is gathered alone, 1/k of the weight)."""

    name: str
    piece: tuple[int, int, int] | None = None


def sdp_layers(ir: IR, ctx: PassContext) -> dict[str, int]:
    """Layer -> dp degree, for the layers the plan runs as ZeRO-3 over more than one rank (a dp
    other than the default mesh's gets its own axis in the `reshard` pass)."""
    out = {}
    for layer in ir.layers:
        strategy = ctx.plan.strategy_for(layer)
        if strategy.sdp and strategy.dp > 1:
            out[layer] = strategy.dp
    return out


def _parameter(gm: fx.GraphModule, target: str) -> torch.nn.Parameter | None:
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None


def _pieces(node: fx.Node) -> list[tuple[fx.Node, tuple[int, int, int]]] | None:
    """[(getitem, (k, dim, i))] when `node` is torch.chunk(param, k, dim) read only by getitems."""
    if node.op != "call_function" or node.target is not torch.chunk or node.kwargs:
        return None
    k, dim = node.args[1], node.args[2] if len(node.args) > 2 else 0
    users = list(node.users)
    if not isinstance(k, int) or not isinstance(dim, int) or dim < 0 or not all(
            u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in users):
        return None
    return [(u, (k, dim, u.args[1])) for u in users]


def parameter_reads(ir: IR) -> dict[fx.Node, dict]:
    """For every op reading parameters: {slot: Read}, where a slot is the graph value the op takes
    as an argument (a get_attr, or a getitem of a chunked get_attr), or, for a leaf module, the
    parameter's name inside the module. Names are canonical (tied weights have one)."""
    names = by_tensor(ir.gm)
    reads: dict[fx.Node, dict] = {}
    for node in ir.graph.nodes:
        param = _parameter(ir.gm, node.target) if node.op == "get_attr" else None
        if param is not None:
            for user in node.users:
                pieces = _pieces(user) if user.args and user.args[0] is node else None
                for slot, piece in pieces or [(node, None)]:
                    for consumer in (slot.users if pieces else [user]):
                        reads.setdefault(consumer, {})[slot] = Read(names[id(param)], piece)
        elif node.op == "call_module":
            for rel, p in ir.gm.get_submodule(node.target).named_parameters():
                reads.setdefault(node, {})[rel] = Read(names[id(p)])
    return reads


def shard_dim(shape, size: int, avoid: set[int]) -> int | None:
    """The first dim that `size` ranks can split evenly, not one the parameter is chunked along
    (dim 0 keeps the shards contiguous)."""
    return next((d for d, n in enumerate(shape) if d not in avoid and n % size == 0 and n >= size), None)


def choose_shardings(ir: IR, reads: dict[fx.Node, dict], layers: dict[str, int]) -> tuple[dict, list[str]]:
    """name -> Shard over dp for parameters read in sdp layers; and those left replicated."""
    sizes: dict[str, int] = {}
    avoid: dict[str, set[int]] = {}
    for node, slots in reads.items():
        for read in slots.values():
            avoid.setdefault(read.name, set()).update({read.piece[1]} if read.piece else set())
            if ir.meta(node).layer in layers:
                sizes[read.name] = layers[ir.meta(node).layer]
    shardings, replicated = {}, []
    for name, size in sizes.items():
        shape = local_shape(ir.gm.get_parameter(name).shape, ir.param_shardings.get(name))
        dim = shard_dim(shape, size, avoid[name])
        if dim is None:
            replicated.append(name)
        else:
            shardings[name] = Shard(AXIS, dim, size)
    return shardings, replicated


def _annotate(ir: IR, node: fx.Node, like: fx.Node, placement: Placement | None = None, shape=None,
              dtype=None) -> fx.Node:
    meta = ir.meta(node)
    meta.layer, meta.placement = ir.meta(like).layer, placement
    if shape is not None:
        meta.shape, meta.dtype = tuple(shape), str(dtype)
        meta.output_bytes = math.prod(shape) * dtype.itemsize
    return node


def gather_units(ir: IR, reads: dict[fx.Node, dict], shardings: dict, per_op: set[str],
                 share_tied: bool = True) -> list[list[fx.Node]]:
    """The ops reading sharded parameters, grouped into units whose parameters are gathered
    together: one unit per layer (FSDP's granularity: one collective per layer and direction),
    or one per op in the layers of `per_op` (operator splitting: one op's weights, 1/k of a split
    Linear's, are gathered at a time). Layers that share a parameter (GPT's embedding = LM head)
    share a unit, gathered once, as FSDP must group tied weights; not when `share_tied` is off
    (pipelining: the layers may run in different stages, on different ranks, and a shared unit
    would send the gathered weight between them; each gathers it, autograd sums both
    reduce-scattered gradients in the shard). Each unit's ops are in graph order; units are
    ordered by their last op."""
    order = {node: i for i, node in enumerate(ir.graph.nodes)}
    by_key: dict[object, list[fx.Node]] = {}
    for node in ir.graph.nodes:
        if any(read.name in shardings for read in reads.get(node, {}).values()):
            layer = ir.meta(node).layer
            by_key.setdefault(node if layer in per_op else layer, []).append(node)
    owner: dict[str, object] = {}  # parameter -> the first layer unit reading it
    units: dict[object, list[fx.Node]] = {}
    for key, nodes in by_key.items():
        if isinstance(key, str):
            names = {r.name for n in nodes for r in reads[n].values() if r.name in shardings}
            key = next((owner[name] for name in names if name in owner), key) if share_tied else key
            for name in names:
                owner.setdefault(name, key)
        units.setdefault(key, []).extend(nodes)
    return sorted((sorted(nodes, key=order.__getitem__) for nodes in units.values()), key=lambda u: order[u[-1]])


def read_shape(ir: IR, read: Read) -> torch.Size:
    """The global shape of what `read` reads (the parameter, or its piece); a gather rebuilds it
    cut by the parameter's tensor-parallel shard."""
    shape = ir.gm.get_parameter(read.name).shape
    if read.piece is None:
        return torch.Size(shape)
    k, dim, _ = read.piece
    return local_shape(shape, Shard(AXIS, dim, k))


def _gather(ir: IR, consumers: list[fx.Node], wanted: list[Read], shardings: dict, start: fx.Node,
            recomputed: bool) -> tuple[fx.Node, dict[Read, fx.Node]]:
    """Shards (or pieces of shards) -> sdp_prefetch before `start` -> sdp_gather before the unit's
    first op -> a getitem per read. `recomputed`: the gather is in a checkpointed layer, its
    prefetch outside it (backward re-runs the gather with forward's unit)."""
    first, graph = consumers[0], ir.graph
    with graph.inserting_before(start):
        params = {}
        for name in dict.fromkeys(r.name for r in wanted):
            p, tp = ir.gm.get_parameter(name), ir.param_shardings.get(name)
            params[name] = _annotate(ir, graph.get_attr(name), start, Placement.of(tp, shardings[name]), p.shape,
                                     p.dtype)
        shards = []
        for read in wanted:
            shard = params[read.name]
            if read.piece is not None:
                k, dim, i = read.piece
                pieces = _annotate(ir, graph.call_function(torch.chunk, (shard, k, dim)), start)
                shard = _annotate(ir, graph.call_function(operator.getitem, (pieces, i)), start)
            shards.append(shard)
        args = (tuple(shards), tuple(shardings[r.name].dim for r in wanted), AXIS, shardings[wanted[0].name].size)
        prefetch = _annotate(ir, graph.call_function(sdp.sdp_prefetch, args), start)
    with graph.inserting_before(first):
        gather = graph.call_function(sdp.sdp_gather, args,
                                     {"prefetched": prefetch, **({"recomputed": True} if recomputed else {})})
        _annotate(ir, gather, first)
        items = {}
        for i, read in enumerate(wanted):
            tp, dtype = ir.param_shardings.get(read.name), ir.gm.get_parameter(read.name).dtype
            label = f"_piece{read.piece[2]}" if read.piece else "_full"
            item = graph.create_node("call_function", operator.getitem, (gather, i),
                                     name=read.name.replace(".", "_") + label)
            items[read] = _annotate(ir, item, first, Placement.of(tp), read_shape(ir, read), dtype)
    return gather, items


def _wrap(ir: IR, node: fx.Node, gathered: dict, plain: bool) -> fx.Node:
    """The op `node` rewritten to read gathered parameters: through an sdp_* runner that keeps
    autograd from holding them, or `plain`ly where autograd may hold them (see the pass)."""
    graph = ir.graph
    args = tuple(gathered.get(a, a) if isinstance(a, fx.Node) else a for a in node.args)
    kwargs = {k: gathered.get(v, v) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
    with graph.inserting_before(node):
        if node.op == "call_module":
            module = graph.get_attr(node.target)
            _annotate(ir, module, node)
            own = {slot: g for slot, g in gathered.items() if isinstance(slot, str)}
            runner = sdp.module_with if plain else sdp.sdp_module
            new = graph.call_function(runner, (module, own) + args, kwargs)
        elif plain:
            node.args, node.kwargs = args, kwargs
            return node
        elif node.op == "call_method":
            new = graph.call_function(sdp.sdp_method, (node.target,) + args, kwargs)
        elif node.op == "call_function":
            new = graph.call_function(sdp.sdp_function, (_qualified_name(node),) + args, kwargs)
        else:
            raise PcompileError(f"node {node.name} ({node.op}) reads a parameter and cannot run under ZeRO-3",
                                "do not shard this layer (sdp=False)")
    new.meta = dict(node.meta)
    name = node.name
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new._rename(name)  # the dump keeps reading "blocks_0_attn_q = sdp_module(...)"
    return new


def _qualified_name(node: fx.Node) -> str:
    qualname = _get_qualified_name(node.target)
    try:
        resolved = sdp.resolve(qualname)
    except (ImportError, AttributeError):
        resolved = None
    if resolved is not node.target:
        raise PcompileError(f"op {node.name} ({qualname}) reads a sharded parameter but pcompile cannot name the "
                            "function to call it under ZeRO-3", "use a module-level function or a torch op in the "
                            "model, or do not shard this layer (sdp=False)")
    return qualname


def _erase_dead(ir: IR, slots: list[fx.Node]) -> None:
    """Erase the replaced reads (get_attr, or get_attr -> chunk -> getitem) nothing uses any more."""
    candidates = set(slots)
    for slot in slots:
        if slot.op == "call_function":  # a piece: getitem(chunk(get_attr))
            candidates.update({slot.args[0], slot.args[0].args[0]})
    for node in reversed(list(ir.graph.nodes)):
        if node in candidates and not node.users:
            ir.graph.erase_node(node)


def _prefetch_across(ir: IR, ctx: PassContext, previous: fx.Node, layer: str) -> bool:
    """Whether a unit of `layer` may issue its all-gather before `previous` (the previous
    unit's first op): one stage (pp = 1), and one dp on both sides (see the module doc)."""
    return ctx.plan.pp == 1 and ctx.plan.strategy_for(ir.meta(previous).layer).dp == ctx.plan.strategy_for(layer).dp


@register_pass("sharded_data_parallel", kind="rewrite", requires=("tensor_parallel", "operator_split"),
               ensures=("sharded_data_parallel",))
def sharded_data_parallel(ir: IR, ctx: PassContext) -> IR:
    """ZeRO-3 for sdp layers: parameters sharded over dp, one sdp_gather per unit (reduce-scatter backward)."""
    layers = sdp_layers(ir, ctx)
    if not layers:
        return ir
    reads = parameter_reads(ir)
    shardings, replicated = choose_shardings(ir, reads, layers)
    per_op = {layer for layer in layers if ctx.plan.strategy_for(layer).split > 1}
    recomputed = {layer for layer in ir.layers if ctx.plan.strategy_for(layer).checkpoint}
    units = gather_units(ir, reads, shardings, per_op, share_tied=ctx.plan.pp == 1)
    order = {node: i for i, node in enumerate(ir.graph.nodes)}
    previous = None  # the first op of the unit gathered before, in graph order
    for consumers in sorted(units, key=lambda unit: order[unit[0]]):
        wanted = list(dict.fromkeys(r for c in consumers for r in reads[c].values() if r.name in shardings))
        layer = ir.meta(consumers[0]).layer
        start = previous if previous is not None and _prefetch_across(ir, ctx, previous, layer) else consumers[0]
        _, items = _gather(ir, consumers, wanted, shardings, start,
                           layer in recomputed and ir.meta(start).layer != layer)
        wrapped = []
        for node in consumers:
            gathered = {slot: items[read] for slot, read in reads[node].items() if read.name in shardings}
            # A collective reading a parameter (sp's tp_copy of a norm weight) runs plainly: the
            # backend binds axis names only in collective nodes, not inside sdp_function's arguments.
            wrapped.append(_wrap(ir, node, gathered, ir.meta(node).layer in recomputed or consumers is units[-1]
                                 or ops.is_collective(node)))
        previous = wrapped[0]
    _erase_dead(ir, [slot for slots in reads.values() for slot in slots if isinstance(slot, fx.Node)])
    ir.graph.lint()
    ir.gm.recompile()
    numel = sum(ir.gm.get_parameter(n).numel() for n in shardings)
    ctx.report.append(f"sharded data parallel (ZeRO-3) in {len(layers)} layer(s): {len(shardings)} parameters "
                      f"({numel} elements) sharded over dp={max(layers.values())}"
                      + (f"; replicated (no dim divisible by dp): {', '.join(replicated)}" if replicated else ""))
    return ir.replace(sdp_shardings=under_every_name(ir.gm, shardings))
