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

Ordering: after tensor_parallel and sharded_data_parallel (it renames their collectives),
before checkpoint and pipeline_split. Pipelined plans (pp > 1) must keep one grouping.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from pcompile.runtime import collectives, batch_regroup, sdp
from pcompile.errors import PcompileError
from pcompile.ir import IR
from pcompile.ir.pass_manager import PassContext, register_pass
from pcompile.ir.fake import fake_run
from pcompile.passes.tensor_parallel import local_shape

LAYOUT_KEY = "pcompile.mixed"  # gm.meta[LAYOUT_KEY]: MixedLayout, read by pcompile.backends.layer_groups
UNKNOWN = "unknown"  # a value whose batch dependence cannot be resharded


@dataclass(frozen=True)
class MixedLayout:
    """What the backend needs: how the input batch is split, where the loss parts are, and the
    dp axis each parameter's gradient is summed over."""

    input_axis: str
    input_dp: int
    loss_axis: str
    loss_dp: int
    param_axes: dict  # canonical parameter name -> (dp axis, dp degree)


def axis_name(kind: str, size: int, default: int) -> str:
    """"tp" / "dp" for the default mesh's degree, else the degree-named axis ("tp4", "dp1")."""
    return kind if size == default else f"{kind}{size}"


def _check_plan(ir: IR, ctx: PassContext, dps: dict[str, int]) -> None:
    plan = ctx.plan
    if plan.pp > 1:
        raise PcompileError("layers with different (dp, tp) groupings are not lowered with pipelining (pp > 1)",
                            "give every layer the plan's default dp and tp when pp > 1")
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


def runtime_op(node: fx.Node) -> bool:
    """A call of one of pcompile's run-time ops (tp, sp, vocab, sdp collectives...): those name
    axes as an argument followed by the group size."""
    return node.op == "call_function" and getattr(node.target, "__module__", "").startswith("pcompile.")


def _group_size(node: fx.Node, kind: str) -> int | None:
    """The group size a run-time op names after its `kind` ("tp" / "dp") axis argument."""
    args = list(node.args)
    return next((args[i + 1] for i, a in enumerate(args[:-1]) if a == kind and isinstance(args[i + 1], int)), None)


def adopt_entries(ir: IR, tps: dict[str, int]) -> int:
    """Move each tp op that enters a later layer's tp region (a tp_copy of a column Linear that
    reads the previous layer's output directly) into that layer: tensor_parallel labels it with
    its source's layer, but it runs at the reader's grouping, so the batch must be regrouped
    before it. It moves before its first user, keeping layers contiguous."""
    moved = 0
    for node in list(ir.graph.nodes):
        layers = {ir.meta(u).layer for u in node.users}
        if not runtime_op(node) or len(layers) != 1:
            continue
        (layer,) = layers
        if tps[layer] != tps[ir.meta(node).layer] and _group_size(node, "tp") == tps[layer]:
            first = min(node.users, key=list(ir.graph.nodes).index)
            first.prepend(node)
            ir.meta(node).layer = layer
            moved += 1
    return moved


def rename_axes(ir: IR, default_dp: int, default_tp: int) -> None:
    """Collectives, tp shardings and sdp shardings of non-default groupings -> degree-named axes."""
    table = {"tp": default_tp, "dp": default_dp}
    for node in ir.graph.nodes:
        if not runtime_op(node):
            continue
        args = list(node.args)
        for i, arg in enumerate(args[:-1]):
            if isinstance(arg, str) and arg in table and isinstance(args[i + 1], int):
                args[i] = axis_name(arg, args[i + 1], table[arg])
        node.args = tuple(args)
    ir.param_shardings = {name: dataclasses.replace(s, axis=axis_name(s.axis, s.size, table[s.axis]))
                          if s.axis in table else s for name, s in ir.param_shardings.items()}
    if sdp.SHARDINGS_KEY in ir.gm.meta:
        ir.gm.meta[sdp.SHARDINGS_KEY] = {name: dataclasses.replace(s, axis=axis_name("dp", s.size, default_dp))
                                         for name, s in ir.gm.meta[sdp.SHARDINGS_KEY].items()}


def local_param_shape(ir: IR):
    """(name, full shape) -> this rank's shape of the parameter: tp shard, then sdp shard
    (fake_run's `shard`; the ONNX backend's local shapes too)."""
    sdp_shardings = sdp.param_shardings(ir.gm)

    def shard(name, shape):
        return local_shape(local_shape(shape, ir.param_shardings.get(name)), sdp_shardings.get(name))
    return shard


def _values(ir: IR, inputs: tuple) -> dict[fx.Node, object]:
    """Every node's fake value (tensors as their shapes) on this rank's shards."""
    out: dict[fx.Node, object] = {}

    def record(node, value):
        out[node] = torch.Size(value.shape) if isinstance(value, torch.Tensor) else value
    with collectives.simulate():
        fake_run(ir, inputs, record, shard=local_param_shape(ir), grad=False)
    return out


def part_of(inputs: tuple, parts: int, index: int = 0) -> tuple:
    """Part `index` of `parts` of every batched input (the backend's split of the batch)."""
    return tuple(x.chunk(parts)[index] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)


def batch_dims(full: dict[fx.Node, object], part: dict[fx.Node, object], parts: int) -> dict[fx.Node, object]:
    """node -> the dim its value is split along when the batch is (None: batch-independent,
    UNKNOWN: depends on the batch in a way a split along one dim cannot express), from its
    values at the full batch and at 1/parts of it."""
    dims: dict[fx.Node, object] = {}
    for node, value in full.items():
        small = part[node]
        if isinstance(value, torch.Size) and isinstance(small, torch.Size) and len(value) == len(small):
            changed = [d for d, (n, m) in enumerate(zip(value, small)) if n != m]
            dims[node] = (None if not changed else changed[0]
                          if len(changed) == 1 and value[changed[0]] == parts * small[changed[0]] else UNKNOWN)
        else:
            dims[node] = None if _same(value, small) else UNKNOWN
    return dims


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tuples of tensors or symbolic values: treat as batch-dependent
        return False


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
            if dims[source] is UNKNOWN:
                raise PcompileError(f"{source.name} (layer {ir.meta(source).layer!r}, dp={a}) depends on the batch "
                                    f"and is read by {node.name} (layer {layer!r}, dp={b}), but it is not a tensor "
                                    "with one batch dim that pcompile can regroup",
                                    "compute batch sizes in the layer that uses them, or give both layers one dp")
            key = (source, layer)
            if key not in made:
                fn, size = (batch_regroup.batch_gather, a // b) if b < a else (batch_regroup.batch_slice, b // a)
                axis = batch_regroup.reshard_axis(min(a, b), max(a, b))
                with ir.graph.inserting_before(node):
                    made[key] = ir.graph.call_function(fn, (source, dims[source], axis, size))
                meta = ir.meta(made[key])
                src = ir.meta(source)
                meta.layer, meta.shape, meta.dtype = layer, src.shape, src.dtype
                meta.output_bytes, meta.sharding = src.output_bytes, src.sharding
            node.replace_input_with(source, made[key])
    return len(made)


def param_layers(ir: IR) -> dict[str, set[str]]:
    """Canonical parameter name -> the layers that read it (get_attr users, called modules, and
    modules the ZeRO-3 runners call with some of their parameters)."""
    names = {id(p): name for name, p in ir.gm.named_parameters()}
    out: dict[str, set[str]] = {}
    for node in ir.graph.nodes:
        if node.op == "get_attr":
            obj = _attr(ir.gm, node.target)
            if isinstance(obj, torch.nn.Parameter):
                readers = {ir.meta(u).layer for u in node.users} or {ir.meta(node).layer}
                out.setdefault(names[id(obj)], set()).update(readers)
                continue
            params = obj.parameters() if isinstance(obj, torch.nn.Module) else ()
        elif node.op == "call_module":
            params = ir.gm.get_submodule(node.target).parameters()
        else:
            continue
        for p in params:
            out.setdefault(names[id(p)], set()).add(ir.meta(node).layer)
    return out


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def scale_shared_reads(ir: IR, name: str, factors: dict[str, float]) -> None:
    """Scale the gradient of parameter `name` by factors[layer] at its reads in those layers."""
    param = ir.gm.get_parameter(name)
    graph = ir.graph
    for node in list(graph.nodes):
        layer = ir.meta(node).layer
        if layer not in factors:
            continue
        if node.op == "get_attr" and _attr(ir.gm, node.target) is param:
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
        meta.layer, meta.shape, meta.dtype, meta.sharding = layer, ir.meta(read).shape, ir.meta(read).dtype, "R"
        for user in users:
            user.replace_input_with(read, scaled)


def param_axes(ir: IR, dps: dict[str, int], default_dp: int) -> dict[str, tuple[str, int]]:
    """Each parameter's gradient-sum axis (its readers' finest dp); shared reads scaled to it."""
    sharded = set(ir.param_shardings) | set(sdp.param_shardings(ir.gm))
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


def check_batch_split(ir: IR, inputs: tuple, input_dp: int, dps: dict[str, int], full: dict[fx.Node, object],
                      dims: dict[fx.Node, object]) -> None:
    """Run one rank's graph on fake tensors: every batched value holds 1/dp of its layer's batch."""
    local = _values(ir, part_of(inputs, input_dp))
    for node, value in local.items():
        source = node.args[0] if node.target in batch_regroup.COLLECTIVES else node
        dim = dims.get(source)
        if dim is None or dim is UNKNOWN or not isinstance(value, torch.Size):
            continue
        expected = full[source][dim] // dps[ir.meta(node).layer]
        if value[dim] != expected:
            raise PcompileError(f"internal error: after resharding {node.name} holds {value[dim]} of the batch dim "
                                f"{dim}, expected {expected}", "this is a pcompile bug; please report it")


@register_pass("reshard", kind="rewrite")
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
    full = _values(ir, inputs)
    dims = batch_dims(full, _values(ir, part_of(inputs, parts)), parts)
    count = insert_reshards(ir, dps, dims)
    axes = param_axes(ir, dps, default_dp)
    ir.graph.lint()
    ir.gm.recompile()
    placeholders = [n for n in ir.graph.nodes if n.op == "placeholder"]
    first = ir.meta(placeholders[0]).layer if placeholders else ir.layers[0]
    check_batch_split(ir, inputs, dps[first], dps, full, dims)
    last = ir.meta(next(n for n in reversed(ir.graph.nodes) if n.op == "output")).layer
    ir.gm.meta[LAYOUT_KEY] = MixedLayout(axis_name("dp", dps[first], default_dp), dps[first],
                                         axis_name("dp", dps[last], default_dp), dps[last], axes)
    groupings = sorted({plan.strategy_for(layer).describe() for layer in ir.layers})
    ctx.report.append(f"reshard: layers run as {', '.join(groupings)}; {count} batch reshard(s) between them")
    return ir

