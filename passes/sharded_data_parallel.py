"""Rewrite: sharded data parallelism (ZeRO-3) for the layers whose strategy has sdp=True.

A parameter read by an sdp layer lives sharded over the "dp" mesh axis: each rank keeps a
1/dp chunk along one dim. Its reads become explicit graph collectives: one `sdp_gather` node
per unit (all-gather forward, reduce-scatter averaged over dp backward, see pcompile/sdp.py)
placed right before the unit's first op, and a getitem per parameter, freed after its last
use. A unit is a layer (one collective per layer and direction, as FSDP per block), or one
op in layers with operator splitting (split > 1: one op's weights at a time). The ops run
through `sdp_module` (a leaf module, as a functional call with the gathered parameters) or
`sdp_function` / `sdp_method`, which keep autograd from holding gathered weights until
backward. Parameters keep their names in gm.named_parameters(); the sdp_gather nodes say how
each is sharded (`pcompile.sdp.param_shardings`), on top of any tensor-parallel split.

A tied parameter read by an sdp layer and a dp layer is sharded (the dp layer gathers it
too). A parameter with no dim divisible by dp stays replicated and data parallel.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from pcompile import collectives, sdp
from pcompile.errors import PcompileError
from pcompile.ir import IR, ParamSharding
from pcompile.passmanager import PassContext, register_pass
from pcompile.passes._fake import fake_run
from pcompile.passes.tensor_parallel import local_shape

AXIS = "dp"


def sdp_layers(ir: IR, ctx: PassContext) -> dict[str, int]:
    """Layer -> dp degree, for the layers the plan runs as ZeRO-3 over more than one rank."""
    mesh_dp = ctx.plan.default.dp
    out = {}
    for layer in ir.layers:
        strategy = ctx.plan.strategy_for(layer)
        if strategy.sdp and strategy.dp > 1:
            if strategy.dp != mesh_dp:
                raise PcompileError(f"layer {layer!r} is sdp over dp={strategy.dp} but the mesh's dp axis has "
                                    f"{mesh_dp} ranks", "give sdp layers the plan's default dp degree")
            out[layer] = strategy.dp
    return out


def canonical_names(gm: fx.GraphModule) -> dict[int, str]:
    """id(parameter) -> the one name gm.named_parameters() lists it under (tied weights have one)."""
    return {id(p): name for name, p in gm.named_parameters()}


def parameter_reads(ir: IR, names: dict[int, str]) -> dict[fx.Node, dict]:
    """For every op reading parameters: {slot: name}, where a slot is the get_attr node the op
    takes as an argument, or (for a leaf module) the parameter's name inside the module."""
    reads: dict[fx.Node, dict] = {}
    for node in ir.graph.nodes:
        if node.op == "get_attr" and isinstance(getattr_or_none(ir.gm, node.target), torch.nn.Parameter):
            name = names[id(ir.gm.get_parameter(node.target))]
            for user in node.users:
                reads.setdefault(user, {})[node] = name
        elif node.op == "call_module":
            for rel, p in ir.gm.get_submodule(node.target).named_parameters():
                reads.setdefault(node, {})[rel] = names[id(p)]
    return reads


def getattr_or_none(gm: fx.GraphModule, target: str):
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None


def shard_dim(shape, size: int) -> int | None:
    """The first dim that `size` ranks can split evenly (dim 0 keeps chunks contiguous)."""
    return next((d for d, n in enumerate(shape) if n % size == 0 and n >= size), None)


def choose_shardings(ir: IR, reads: dict[fx.Node, dict], layers: dict[str, int]) -> tuple[dict, list[str]]:
    """name -> ParamSharding over dp for parameters read in sdp layers; and those left replicated."""
    shardings, replicated = {}, []
    for node, slots in reads.items():
        size = layers.get(ir.meta(node).layer)
        for name in slots.values():
            if size is None or name in shardings or name in replicated:
                continue
            shape = local_shape(ir.gm.get_parameter(name).shape, ir.param_shardings.get(name))
            dim = shard_dim(shape, size)
            if dim is None:
                replicated.append(name)
            else:
                shardings[name] = ParamSharding(AXIS, dim, size)
    return shardings, replicated


def _annotate(ir: IR, node: fx.Node, like: fx.Node, sharding: str | None = None, name: str | None = None) -> None:
    meta = ir.meta(node)
    meta.layer, meta.sharding = ir.meta(like).layer, sharding
    if name is not None:
        param = ir.gm.get_parameter(name)
        meta.shape, meta.dtype = tuple(param.shape), str(param.dtype)
        meta.output_bytes = param.numel() * param.element_size()


def gather_units(ir: IR, reads: dict[fx.Node, dict], shardings: dict, per_op: set[str]) -> list[list[fx.Node]]:
    """The ops reading sharded parameters, in graph order, grouped into units whose parameters are
    gathered together: one unit per layer (FSDP's granularity: one collective per layer and
    direction), or one per op in the layers of `per_op` (operator splitting: one op's weights,
    1/k of a split Linear's, are gathered at a time)."""
    units: dict[object, list[fx.Node]] = {}
    for node in ir.graph.nodes:
        if any(name in shardings for name in reads.get(node, {}).values()):
            layer = ir.meta(node).layer
            units.setdefault(node if layer in per_op else layer, []).append(node)
    return list(units.values())


def _gather(ir: IR, consumers: list[fx.Node], names: list[str], shardings: dict) -> dict[str, fx.Node]:
    """get_attr of each shard -> one sdp_gather -> getitem per parameter, before the unit's first op."""
    first = consumers[0]
    with ir.graph.inserting_before(first):
        shards = tuple(ir.graph.get_attr(name) for name in names)
        dims = tuple(shardings[name].dim for name in names)
        gather = ir.graph.call_function(sdp.sdp_gather, (shards, dims, AXIS, shardings[names[0]].size))
        items = {name: ir.graph.create_node("call_function", operator.getitem, (gather, i),
                                            name=name.replace(".", "_") + "_full") for i, name in enumerate(names)}
    _annotate(ir, gather, first)
    for shard, name in zip(shards, names):
        tp = ir.param_shardings.get(name)
        tp_text = f"S({tp.dim})@{tp.axis}," if tp is not None else ""
        _annotate(ir, shard, first, f"{tp_text}S({shardings[name].dim})@{AXIS}", name)
        _annotate(ir, items[name], first, f"S({tp.dim})@{tp.axis}" if tp is not None else "R", name)
    return items


def _wrap(ir: IR, node: fx.Node, gathered: dict) -> fx.Node:
    """The op `node` rewritten to read gathered parameters through an sdp_* runner."""
    graph = ir.graph
    args = tuple(gathered.get(a, a) if isinstance(a, fx.Node) else a for a in node.args)
    kwargs = {k: gathered.get(v, v) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
    with graph.inserting_before(node):
        if node.op == "call_module":
            module = graph.get_attr(node.target)
            _annotate(ir, module, node)
            own = {slot: g for slot, g in gathered.items() if isinstance(slot, str)}
            new = graph.call_function(sdp.sdp_module, (module, own) + args, kwargs)
        elif node.op == "call_method":
            new = graph.call_function(sdp.sdp_method, (node.target,) + args, kwargs)
        elif node.op == "call_function":
            qualname = _get_qualified_name(node.target)
            try:
                resolved = sdp.resolve(qualname)
            except (ImportError, AttributeError):
                resolved = None
            if resolved is not node.target:
                raise PcompileError(f"op {node.name} ({qualname}) reads a sharded parameter but pcompile cannot "
                                    "name the function to call it under ZeRO-3",
                                    "use a module-level function or a torch op in the model, or do not shard "
                                    "this layer (sdp=False)")
            new = graph.call_function(sdp.sdp_function, (qualname,) + args, kwargs)
        else:
            raise PcompileError(f"node {node.name} ({node.op}) reads a parameter and cannot run under ZeRO-3",
                                "do not shard this layer (sdp=False)")
    new.meta = dict(node.meta)
    name = node.name
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new._rename(name)  # the dump keeps reading "blocks_0_attn_q = sdp_module(...)"
    return new


def check_gathered_shapes(ir: IR, inputs: tuple, shardings: dict[str, ParamSharding]) -> None:
    """Run the graph on fake per-rank shards: every gather must rebuild the tensor-parallel local shape."""
    tp_local = {name: local_shape(p.shape, ir.param_shardings.get(name)) for name, p in ir.gm.named_parameters()}

    def shard(name, shape):
        return local_shape(tp_local[name], shardings.get(name))

    def check(node: fx.Node, value) -> None:
        if node.op == "call_function" and node.target is sdp.sdp_gather:
            for shard, full in zip(node.args[0], value):
                expected = tp_local[shard.target]
                if tuple(full.shape) != tuple(expected):
                    raise PcompileError(f"internal error: {node.name} gathers {shard.target} to {list(full.shape)}, "
                                        f"expected {list(expected)}", "this is a pcompile bug; please report it")

    with collectives.simulate():
        fake_run(ir, inputs, check, shard=shard, grad=False)


@register_pass("sharded_data_parallel", kind="rewrite")
def sharded_data_parallel(ir: IR, ctx: PassContext) -> IR:
    """ZeRO-3 for sdp layers: parameters sharded over dp, sdp_gather before each use (reduce-scatter backward)."""
    layers = sdp_layers(ir, ctx)
    if not layers:
        return ir
    reads = parameter_reads(ir, canonical_names(ir.gm))
    shardings, replicated = choose_shardings(ir, reads, layers)
    per_op = {layer for layer in layers if ctx.plan.strategy_for(layer).split > 1}
    for consumers in gather_units(ir, reads, shardings, per_op):
        names = list(dict.fromkeys(n for c in consumers for n in reads[c].values() if n in shardings))
        items = _gather(ir, consumers, names, shardings)
        for node in consumers:
            _wrap(ir, node, {slot: items[name] for slot, name in reads[node].items() if name in shardings})
    stale = {slot for slots in reads.values() for slot in slots if isinstance(slot, fx.Node)}
    for node in stale:
        if not node.users:  # a replicated read that the gathers replaced
            ir.graph.erase_node(node)
    ir.graph.lint()
    ir.gm.recompile()
    check_gathered_shapes(ir, ctx.example_inputs, shardings)
    numel = sum(ir.gm.get_parameter(n).numel() for n in shardings)
    ctx.report.append(f"sharded data parallel (ZeRO-3) in {len(layers)} layer(s): {len(shardings)} parameters "
                      f"({numel} elements) sharded over dp={max(layers.values())}"
                      + (f"; replicated (no dim divisible by dp): {', '.join(replicated)}" if replicated else ""))
    return ir
