"""Rewrite: layers with different (dp, tp) groupings inside one stage.

A layer with tp = k runs on a (N/k, k) mesh (tp innermost, see pcompile/runtime/batch_regroup.py). Layers
whose tp is the plan's default keep the axis names "dp" / "tp" the backend's default mesh
binds; the others get axes named by their degree: their collectives (tp and sdp, found by
the "tp" / "dp" argument and the group size after it), their parameters' tp shardings and
their sdp shardings are renamed to "tp{k}" / "dp{N/k}".

Between layers the batch moves: a value one layer computes on its 1/a of the batch and a
layer at dp = b reads goes through `batch_gather` (b < a) or `batch_slice` (b > a) along its
batch dim, placed in the reading layer before its first use (a checkpointed layer recomputes
it). The batch dim of every value is found by running the graph twice on fake tensors, at
the full batch and at a fraction of it: the dim that shrinks. Values that do not depend on
the batch (positions, masks) cross unchanged; a batch-dependent non-tensor (a batch size read
in one layer, used in another) cannot be resharded and is refused. A tp_copy that
tensor_parallel labelled with its source's layer but that enters the reader's tp region (a
column Linear reading the previous layer's output directly) moves into the reader's layer
first, so the batch is regrouped before it.

Gradients (the backend's part, from the `MixedLayout` this pass records): every rank ends
backward with the gradient of the sum of the last layer's part losses; a parameter's exact
gradient is the sum over its layer's dp group divided by the last layer's dp (the number of
loss parts), not by its own dp. A parameter read by layers at different dp (a tied embedding
and LM head) is summed over its finest dp group; its reads at a coarser dp d are scaled by
d / finest in backward (`grad_scale`), since that group holds each of their parts
finest / d times. Such a parameter must be replicated (not tp- or sdp-sharded).

Pipelines (pp > 1): every stage has the same N/pp ranks, and a layer's (dp, tp) is a grouping
of its stage's ranks, so the degree-named axes are groups of one stage (the pipeline backend
creates each stage's: backends/layer_groups.stage_axis_groups) and pp rank p's local rank i
holds in every stage what rank i holds in the flat (N/pp)-rank layout. An activation crossing a
stage boundary is sent from rank i to rank i of the next stage as it is and regrouped in the
reading layer, in the next stage, exactly as between two layers of one stage; each micro-batch
is regrouped on its own.

Ordering: after tensor_parallel and sharded_data_parallel (it renames their collectives),
before checkpoint and pipeline_split.
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from pcompile.errors import PcompileError
from pcompile.ir import IR, REPLICATED, MixedLayout, Placement, Shard
from pcompile.ir.params import attribute, param_layers
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.mesh import Axis
from pcompile.runtime import batch_regroup, ops, sdp
from pcompile.sharding.batch_dims import batch_dims


def axis_name(kind: str, size: int, default: int) -> str:
    """"tp" / "dp" for the default mesh's degree, else the degree-named axis ("tp4", "dp1")."""
    return Axis.of_degree(kind, size, default).name


def _check_plan(ir: IR, ctx: PassContext, dps: dict[str, int]) -> None:
    plan = ctx.plan
    if plan.pp > 1:
        _check_pipelined(ir, plan, dps, ctx.example_inputs)
    sp = [layer for layer in ir.layers if plan.strategy_for(layer).sp]
    if sp:
        raise PcompileError(f"sequence parallelism in {sp} with layers of different tp degrees: the sequence "
                            "split between layers is not resharded", "use sp=false, or one tp for every layer")
    degrees = sorted(set(dps.values()))
    for small, large in zip(degrees, degrees[1:]):
        if large % small:
            raise PcompileError(f"dp degrees {small} and {large} in one plan: a batch split into {large} parts "
                                f"cannot be regrouped into {small}", "use dp (and tp) degrees that divide each other")
    batch = ctx.example_inputs[0].shape[0] if getattr(ctx.example_inputs[0], "ndim", 0) else 1
    if batch % degrees[-1]:
        raise PcompileError(f"global batch {batch} is not divisible by dp={degrees[-1]} (layer "
                            f"{next(l for l, d in dps.items() if d == degrees[-1])!r})",
                            f"use a global batch that is a multiple of {degrees[-1]}")


def _check_pipelined(ir: IR, plan, dps: dict[str, int], inputs) -> None:
    """What a pipelined plan with mixed groupings needs beyond a flat one: every micro-batch
    regroups between its layers' dp degrees (so it must split into the finest dp), and no expert
    parallelism (its groups are built on the default grouping of each stage)."""
    ep = [layer for layer in ir.layers if plan.strategy_for(layer).ep > 1]
    if ep:
        raise PcompileError(f"expert parallelism in {ep} with layers of different (dp, tp) groupings in a pipeline",
                            "give every layer the plan's default dp and tp, or ep=1")
    batch = inputs[0].shape[0] if getattr(inputs[0], "ndim", 0) else 1
    finest = max(dps.values())
    if batch % (finest * plan.num_microbatches):
        layer = next(layer for layer, d in dps.items() if d == finest)
        raise PcompileError(f"global batch {batch} does not split into {plan.num_microbatches} micro-batches for "
                            f"dp={finest} (layer {layer!r}): each micro-batch is regrouped between the layers' dp "
                            "degrees", f"use a global batch that is a multiple of {finest * plan.num_microbatches}")


def adopt_entries(ir: IR, tps: dict[str, int]) -> int:
    """Move each tp op that enters a later layer's tp region (a tp_copy of a column Linear that
    reads the previous layer's output directly) into that layer: tensor_parallel labels it with
    its source's layer, but it runs at the reader's grouping, so the batch must be regrouped
    before it. It moves before its first user, keeping layers contiguous."""
    moved = 0
    for node in list(ir.graph.nodes):
        layers = {ir.meta(u).layer for u in node.users}
        named = ops.axis_of(node)
        if named is None or len(layers) != 1:
            continue
        (layer,) = layers
        axis, size = named
        if tps[layer] != tps[ir.meta(node).layer] and axis == "tp" and size == tps[layer]:
            first = min(node.users, key=list(ir.graph.nodes).index)
            first.prepend(node)
            ir.meta(node).layer = layer
            moved += 1
    return moved


def rename_axes(ir: IR, default_dp: int, default_tp: int) -> None:
    """Collectives, placements, tp shardings and sdp shardings of non-default groupings ->
    degree-named axes (an axis named "tp" / "dp" whose size is not the default mesh's)."""
    table = {"tp": default_tp, "dp": default_dp}

    def rename(axis: str, size: int) -> str:
        return axis_name(axis, size, table[axis]) if axis in table else axis

    for node in ir.graph.nodes:
        named = ops.axis_of(node)
        if named is not None:
            ops.with_axis(node, rename(*named))
        meta = ir.meta(node)
        if meta.placement is not None:
            meta.placement = meta.placement.with_axes(rename)
    ir.param_shardings = {name: dataclasses.replace(s, axis=rename(s.axis, s.size))
                          for name, s in ir.param_shardings.items()}
    ir.sdp_shardings = {name: dataclasses.replace(s, axis=rename(s.axis, s.size))
                        for name, s in ir.sdp_shardings.items()}


def insert_reshards(ir: IR, dps: dict[str, int], dims: dict[fx.Node, object]) -> int:
    """A batch_gather / batch_slice before the first reader, in each layer whose dp differs from
    the producer's. Returns how many were inserted."""
    made: dict[tuple[fx.Node, str], fx.Node] = {}
    for node in list(ir.graph.nodes):
        layer = ir.meta(node).layer
        for source in node.all_input_nodes:
            a, b = dps[ir.meta(source).layer], dps[layer]
            if a == b or dims.get(source) is None:
                continue
            if not isinstance(dims[source], int):
                raise PcompileError(f"{source.name} (layer {ir.meta(source).layer!r}, dp={a}) depends on the batch "
                                    f"and is read by {node.name} (layer {layer!r}, dp={b}), but it is not a tensor "
                                    "with one batch dim that pcompile can regroup",
                                    "compute batch sizes in the layer that uses them, or give both layers one dp")
            key = (source, layer)
            if key not in made:
                fn, size = (batch_regroup.batch_gather, a // b) if b < a else (batch_regroup.batch_slice, b // a)
                axis = Axis.regroup(min(a, b), max(a, b)).name
                with ir.graph.inserting_before(node):
                    made[key] = ir.graph.call_function(fn, (source, dims[source], axis, size))
                meta = ir.meta(made[key])
                src = ir.meta(source)
                meta.layer, meta.shape, meta.dtype = layer, src.shape, src.dtype
                meta.output_bytes, meta.placement = src.output_bytes, src.placement
            node.replace_input_with(source, made[key])
    return len(made)


def scale_shared_reads(ir: IR, name: str, factors: dict[str, float]) -> None:
    """Scale the gradient of parameter `name` by factors[layer] at its reads in those layers."""
    param = ir.gm.get_parameter(name)
    graph = ir.graph
    for node in list(graph.nodes):
        layer = ir.meta(node).layer
        if layer not in factors:
            continue
        if node.op == "get_attr" and attribute(ir.gm, node.target) is param:
            _scale_get_attr(ir, node, factors)
        elif node.op == "call_module":
            module = ir.gm.get_submodule(node.target)
            own = [rel for rel, p in module.named_parameters() if p is param]
            if not own:
                continue
            with graph.inserting_before(node):
                ref = graph.get_attr(node.target)
                read = graph.get_attr(name)
                scaled = graph.call_function(batch_regroup.grad_scale, (read, factors[layer]))
                call = graph.call_function(sdp.module_with, (ref, {own[0]: scaled}) + tuple(node.args),
                                           dict(node.kwargs))
            for extra in (ref, read, scaled):
                ir.meta(extra).layer = layer
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            call._rename(node.name)


def _scale_get_attr(ir: IR, read: fx.Node, factors: dict[str, float]) -> None:
    """One grad_scale per scaled layer reading `read`, before that layer's first user (layers
    stay contiguous for the checkpoint pass)."""
    for layer, factor in factors.items():
        users = [u for u in read.users if ir.meta(u).layer == layer]
        if not users:
            continue
        with ir.graph.inserting_before(users[0]):
            scaled = ir.graph.call_function(batch_regroup.grad_scale, (read, factor))
        meta = ir.meta(scaled)
        meta.layer, meta.shape, meta.dtype, meta.placement = layer, ir.meta(read).shape, ir.meta(read).dtype, REPLICATED
        for user in users:
            user.replace_input_with(read, scaled)


def param_axes(ir: IR, dps: dict[str, int], default_dp: int) -> dict[str, tuple[str, int]]:
    """Each parameter's gradient-sum axis (its readers' finest dp); shared reads scaled to it."""
    sharded = set(ir.param_shardings) | set(ir.sdp_shardings)
    out = {}
    for name, layers in param_layers(ir).items():
        degrees = {layer: dps[layer] for layer in layers}
        finest = max(degrees.values())
        if len(set(degrees.values())) > 1:
            if name in sharded:
                raise PcompileError(f"parameter {name} is sharded and read by layers at different dp degrees "
                                    f"({degrees})", "give the layers that share it one (dp, tp) and sdp setting")
            scale_shared_reads(ir, name, {layer: d / finest for layer, d in degrees.items() if d != finest})
        out[name] = (axis_name("dp", finest, default_dp), finest)
    return out


def place_batch(ir: IR, dps: dict[str, int], default_dp: int, dims: dict[fx.Node, object]) -> None:
    """Every batch-dependent tensor's placement gets its batch split: its layer's dp over that
    layer's dp axis (the inputs: the first layer's), so the placements invariant checks that
    each layer's values hold 1/dp of the batch after the regrouping."""
    for node in ir.graph.nodes:
        source = node.args[0] if node.target in (batch_regroup.batch_gather, batch_regroup.batch_slice) else node
        dim = dims.get(source)
        meta = ir.meta(node)
        if not isinstance(dim, int) or meta.shape is None:
            continue
        dp = dps[meta.layer]
        batch = Shard(axis_name("dp", dp, default_dp), dim, dp)
        placement = meta.placement or Placement()
        meta.placement = Placement((batch,) + placement.shards, placement.partial)


@register_pass("reshard", kind="rewrite", requires=("tensor_parallel", "sharded_data_parallel"),
               ensures=("reshard",))
def reshard_layers(ir: IR, ctx: PassContext) -> IR:
    """Layers at other (dp, tp) than the plan's default: degree-named axes, batch reshards between layers."""
    plan = ctx.plan
    if all(plan.strategy_for(layer).tp == plan.default.tp for layer in ir.layers):
        return ir
    dps = {layer: plan.strategy_for(layer).dp for layer in ir.layers}
    _check_plan(ir, ctx, dps)
    default_dp, inputs = plan.default.dp, ctx.example_inputs
    adopt_entries(ir, {layer: plan.strategy_for(layer).tp for layer in ir.layers})
    rename_axes(ir, default_dp, plan.default.tp)
    parts = max(dps.values())
    dims = batch_dims(ir, inputs, parts)
    count = insert_reshards(ir, dps, dims)
    place_batch(ir, dps, default_dp, dims)  # before param_axes replaces nodes (their metadata moves along)
    axes = param_axes(ir, dps, default_dp)
    ir.graph.lint()
    ir.gm.recompile()
    placeholders = [n for n in ir.graph.nodes if n.op == "placeholder"]
    first = ir.meta(placeholders[0]).layer if placeholders else ir.layers[0]
    last = ir.meta(next(n for n in reversed(ir.graph.nodes) if n.op == "output")).layer
    layout = MixedLayout(axis_name("dp", dps[first], default_dp), dps[first],
                         axis_name("dp", dps[last], default_dp), dps[last], axes)
    groupings = sorted({plan.strategy_for(layer).describe() for layer in ir.layers})
    ctx.report.append(f"reshard: layers run as {', '.join(groupings)}; {count} batch reshard(s) between them")
    return ir.replace(mixed_layout=layout)
